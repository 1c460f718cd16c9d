"""DDIM (Song et al. 2020, arXiv 2010.02502), deterministic (eta = 0), as diffusers' DDIMScheduler.

From x_t and the model's eps, estimate the clean x0, then re-noise it to the earlier timestep
along the same eps (eq. 12 with sigma_t = 0):

    x_prev = sqrt(alpha_bar_prev) * x0 + sqrt(1 - alpha_bar_prev) * eps

The earlier timestep is t - T // steps whatever the spacing (diffusers' rule: with "linspace" or
"trailing" spacing it need not be the next entry of `timesteps`).
"""

import numpy as np
import torch

from minisd.schedulers.base import Sampler
from minisd.schedulers.schedule import option


class DDIM(Sampler):
    def __init__(self, config: dict):
        super().__init__(config, spacing_default="leading")
        option(config, "thresholding", (False,))  # Imagen's dynamic thresholding is not implemented
        # diffusers' DDIM defaults: the step past t = 0 lands on clean data (alpha_bar = 1), and x0 is
        # clipped to [-1, 1] (pixel-space DDPM habits). SD's configs turn both off.
        alphas_cumprod = self.schedule.alphas_cumprod
        self.final_alpha_cumprod = (torch.tensor(1.0) if config.get("set_alpha_to_one", True)
                                    else alphas_cumprod[0])
        self.clip_x0 = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
        self.stride = None
        self.timestep_values: list[int] = []  # `timesteps` as Python ints

    def set_timesteps(self, steps: int, device="cpu") -> None:
        t = self.spaced(steps).round().astype(np.int64)
        self.timesteps = torch.from_numpy(t).to(device)
        self.timestep_values = t.tolist()  # read by step(): no device read (a host-device sync) per step
        self.stride = self.schedule.num_train_timesteps // steps

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = self.timestep_values[i]
        t_prev = t - self.stride
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "epsilon":  # invert x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
            eps = model_output
            x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)
            x0 = alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * model_output
            eps = alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
