"""PLMS, the pseudo linear multi-step sampler of PNDM (Liu et al. 2022, arXiv 2202.09778), as
diffusers' PNDMScheduler runs it for SD (skip_prk_steps=True), warm-up quirk included.

Each step moves x from timestep t to t - stride (stride = T // steps) with the paper's transfer
part phi (eq. 9). Instead of the model's current eps, phi is fed an Adams-Bashforth combination
of the last few (PLMS, eq. 12), which needs a history. The paper warms that history up with
Runge-Kutta steps (PRK: 3 steps, 12 model calls); diffusers' skip_prk_steps path instead spends
one extra model call on a Heun-like warm-up, and this file reproduces it exactly:

    call 0 at t0: e0 = model(x, t0);  x1 = phi(x, e0, t0 -> t0 - stride)       (first order)
    call 1 at t1: e1 = model(x1, t1); x1 = phi(x, (e0 + e1) / 2, t1 + stride -> t1)
                                       (the same step again from the same x, averaged eps;
                                        e1 itself never enters the history)
    call 2 at t1: e2 = model(x1, t1); x2 = phi(x1, (3 e2 - e0) / 2, t1 -> t1 - stride)
    call 3:       23/12, -16/12, 5/12 of e3, e2, e0; from call 4 on the 4th order (eq. 12)

So t1 is visited twice and `timesteps` has steps + 1 entries (25 steps, SD's leading spacing:
961, 921, 921, 881, ..., 41, 1). The warm-up follows the calls of a run, not the index: an
img2img run that starts midway warms up at its own first two steps, as diffusers' does.
"""

import numpy as np
import torch

from minisd.schedulers.base import Sampler
from minisd.schedulers.schedule import option

# Adams-Bashforth weights for the eps history, newest first, and their common denominator: the
# 4th order is PLMS proper (eq. 12); lower orders serve while the history fills
PLMS_WEIGHTS = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


class PNDM(Sampler):
    def __init__(self, config: dict):
        super().__init__(config, spacing_default="leading")
        # Only the PLMS path exists here. diffusers defaults skip_prk_steps to False (PRK warm-up);
        # every SD config sets it True, so an absent key is read as True, and False is refused.
        option(config, "skip_prk_steps", (True,))
        # Stepping past t = 0 lands on alpha_bar_0 (set_alpha_to_one False, SD's configs and
        # diffusers' PNDM default), not on clean data (alpha_bar = 1).
        alphas_cumprod = self.schedule.alphas_cumprod
        self.final_alpha_cumprod = (torch.tensor(1.0) if config.get("set_alpha_to_one", False)
                                    else alphas_cumprod[0])
        self.stride = None
        self.timestep_values: list[int] = []  # `timesteps` as Python ints
        self.eps_history: list[torch.Tensor] = []  # raw model outputs of this run, oldest first (at most 4)
        self.warmup_x: torch.Tensor | None = None  # x before call 0, until call 1 has redone that step

    def set_timesteps(self, steps: int, device="cpu") -> None:
        t = self.spaced(steps).round().astype(np.int64)
        if self.schedule.alphas_cumprod[t[0]] == 0:
            # its step divides by sqrt(alpha_bar). (diffusers' PNDM ignores rescale_betas_zero_snr and samples
            # such a model on the schedule it was not trained on; minisd's follows the config.)
            raise ValueError(f"PNDM cannot start at timestep {t[0]}, where this zero-terminal-SNR schedule "
                             "has no signal; use 'leading' timestep spacing or another sampler (ddim, euler, "
                             "dpm)")
        t = np.concatenate([t[:2], t[1:]])  # t1 twice: call 1 redoes the first step
        self.timesteps = torch.from_numpy(t).to(device)
        # the step arithmetic reads these host copies: reading `timesteps` on a GPU would make the
        # host wait for the device at every step
        self.timestep_values = t.tolist()
        self.stride = self.schedule.num_train_timesteps // steps
        self.reset()

    def reset(self) -> None:
        self.eps_history = []
        self.warmup_x = None

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = self.timestep_values[i]
        if not self.eps_history:  # call 0
            self.eps_history.append(model_output)
            self.warmup_x = x
            return self.transfer(x, model_output, t, t - self.stride)
        if self.warmup_x is not None:  # call 1: redo call 0's step from its x, with the averaged eps
            eps = (model_output + self.eps_history[-1]) / 2
            x, self.warmup_x = self.warmup_x, None
            return self.transfer(x, eps, t + self.stride, t)
        self.eps_history = self.eps_history[-3:] + [model_output]
        weights, denominator = PLMS_WEIGHTS[len(self.eps_history)]
        eps = sum(w * e for w, e in zip(weights, reversed(self.eps_history))) / denominator
        return self.transfer(x, eps, t, t - self.stride)

    def transfer(self, x: torch.Tensor, model_output: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """PNDM's transfer part phi (eq. 9): x at t -> x at t_prev, given eps (the DDIM step, rewritten)."""
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":
            # eps from v (Salimans & Ho 2022). As in diffusers, the history holds the raw v and is
            # combined first; the combination is converted with this step's alpha_bar and x.
            model_output = alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x
        x_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        eps_denominator = (alpha_bar * (1 - alpha_bar_prev) ** 0.5
                           + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5)
        return x_coeff * x - (alpha_bar_prev - alpha_bar) * model_output / eps_denominator
