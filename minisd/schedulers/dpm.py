"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), as diffusers'
DPMSolverMultistepScheduler runs it by default (algorithm_type "dpmsolver++", solver_order 2).

With Karras' sigma (euler.py), alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma * alpha_t
(x_t = alpha_t x0 + sigma_t eps), and lambda = log(alpha_t / sigma_t) (half the log-SNR), the exact
solution of the probability-flow ODE for the x0-predicting model is a linear term in x plus an
integral over lambda. Each step takes h = lambda_next - lambda and

    x_next = (sigma_next / sigma) x + alpha_next (1 - exp(-h)) D

with D the model's x0 (first order, which is DDIM) or, once a previous x0 exists, the
extrapolation D = x0 + (x0 - x0_prev) / 2r with r = h_prev / h (second order, multistep).
The last step goes to sigma = 0 and is first order: there lambda = inf and x_next = x0.
"""

import numpy as np
import torch

from minisd.schedulers.base import Sampler
from minisd.schedulers.schedule import option

# The options of DPMSolverMultistepScheduler that change its result, and the values minisd
# implements (the first is diffusers' default). diffusers reads DEIS's "deis" and "logrho" and
# UniPC's "bh1"/"bh2" as dpmsolver++ and midpoint, so a DEIS or UniPC config gives the same here.
# lower_order_final and euler_at_final do not matter: with the final sigma 0, the last step is
# always first order, and solver order 2 has no other lowered step.
SUPPORTED = {"solver_order": (2,), "algorithm_type": ("dpmsolver++", "deis"),
             "solver_type": ("midpoint", "logrho", "bh1", "bh2"), "thresholding": (False,),
             "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None),
             "use_beta_sigmas": (False, None), "use_lu_lambdas": (False, None),
             "use_flow_sigmas": (False, None), "final_sigmas_type": ("zero",),
             "lambda_min_clipped": (-float("inf"),), "variance_type": (None,)}


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras' sigma -> (alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def half_log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t), DPM-Solver's time variable (+inf at sigma = 0)."""
    return torch.log(alpha_t) - torch.log(sigma_t)


class DPMSolver(Sampler):
    finite_sigmas = True

    def __init__(self, config: dict):
        super().__init__(config, spacing_default="linspace")
        for key, supported in SUPPORTED.items():
            option(config, key, supported)
        self.sigmas = None  # [steps + 1] float32, on the CPU: sigma at each timestep, then 0
        self.prev_x0: torch.Tensor | None = None  # the previous step's x0 estimate

    def set_timesteps(self, steps: int, device="cpu") -> None:
        # diffusers' DPM-Solver spaces "linspace" and "leading" over steps + 1 points and drops the
        # last (t near 0), so its timesteps differ from the other samplers' (25 steps: 999, 959, ... 40)
        t = self.spaced(steps) if self.spacing == "trailing" else self.spaced(steps + 1)[:-1]
        t = torch.from_numpy(t.round().astype(np.int64))
        self.sigmas = torch.cat([self.schedule.sigmas_at(t), torch.zeros(1)])
        self.timesteps = t.to(device)
        self.reset()

    def reset(self) -> None:
        self.prev_x0 = None

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i].to(x0.dtype))
        return alpha_t * x0 + sigma_t * noise

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_t * model_output) / alpha_t
        else:  # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)
            x0 = alpha_t * x - sigma_t * model_output
        x = x.float()  # as diffusers, the update runs in fp32 whatever the model's dtype
        alpha_next, sigma_next = alpha_sigma(self.sigmas[i + 1])
        lambda_t = half_log_snr(alpha_t, sigma_t)
        h = half_log_snr(alpha_next, sigma_next) - lambda_t
        # first order (DPM-Solver++1, i.e. DDIM): x0 held constant over the step
        x_coeff, x0_coeff = sigma_next / sigma_t, alpha_next * (1.0 - torch.exp(-h))
        x_next = x_coeff * x + x0_coeff * x0
        if self.prev_x0 is not None and i < len(self.timesteps) - 1:
            # second order: x0 taken as linear in lambda, its slope from the previous step's x0;
            # this is Alg. 2's D = x0 + (x0 - x0_prev) / 2r, kept as a separate term as diffusers
            # computes it (so that fp16 model outputs round the same)
            r = (lambda_t - half_log_snr(*alpha_sigma(self.sigmas[i - 1]))) / h
            x_next = x_next + 0.5 * x0_coeff * ((1 / r) * (x0 - self.prev_x0))
        self.prev_x0 = x0
        return x_next.to(model_output.dtype)
