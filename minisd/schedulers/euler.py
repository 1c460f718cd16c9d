"""Euler and Euler ancestral, in Karras et al.'s sigma view (arXiv 2206.00364), as diffusers'
EulerDiscreteScheduler and EulerAncestralDiscreteScheduler run them (k-diffusion's samplers).

Divide x_t by sqrt(alpha_bar_t) and the forward process reads x = x0 + sigma * eps, with
sigma = sqrt((1 - alpha_bar) / alpha_bar). Sampling then follows the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma (eqs. 1 and 3, D the denoised estimate of x0) from sigma_max
to 0. The U-Net was trained on unit-variance inputs, so it sees x / sqrt(sigma^2 + 1) (c_in,
Table 1). Timesteps are floats: sigma is interpolated between the training steps.
"""

import numpy as np
import torch

from minisd.schedulers.base import Sampler, gaussian_like
from minisd.schedulers.schedule import option

# EulerDiscreteScheduler's options that change its sigmas or timesteps, and the values minisd
# implements (the first is diffusers' default): the plain interpolated sigmas, ending at 0
EULER_SUPPORTED = {"interpolation_type": ("linear",), "use_karras_sigmas": (False, None),
                   "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
                   "timestep_type": ("discrete",), "final_sigmas_type": ("zero",)}


class KarrasSampler(Sampler):
    """What Euler and Euler ancestral share: sigmas, input scaling, noising, the x0 estimate."""

    finite_sigmas = True

    def __init__(self, config: dict):
        super().__init__(config, spacing_default="linspace")
        self.sigmas = None  # [steps + 1] float32, on the CPU: sigma at each timestep, then 0

    def set_timesteps(self, steps: int, device="cpu") -> None:
        t = torch.from_numpy(self.spaced(steps).astype(np.float32))
        self.sigmas = torch.cat([self.schedule.sigmas_at(t), torch.zeros(1)])  # the run ends at sigma = 0
        self.timesteps = t.to(device)

    @property
    def init_noise_sigma(self) -> float:
        # diffusers' rule: sigma_max (as k-diffusion starts at sigma_max * eps) for "linspace" and
        # "trailing" spacing, but sqrt(sigma_max^2 + 1), the std of x0 + sigma_max * eps for
        # unit-variance x0, for "leading"
        sigma_max = self.sigmas.max()
        return float(sigma_max if self.spacing != "leading" else (sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + self.sigmas[i].to(x0.dtype) * noise

    def denoised(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """D(x; sigma), the x0 estimate, from the model's eps or v."""
        sigma = self.sigmas[i]
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        # the U-Net's v is about x_vp = x / sqrt(sigma^2 + 1) = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps,
        # so x0 = sqrt(alpha_bar) x_vp - sqrt(1 - alpha_bar) v with sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1)
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


class Euler(KarrasSampler):
    """One Euler step of the ODE per model call (Algorithm 1, lines 4-5 with sigma(t) = t, s(t) = 1;
    no Heun correction)."""

    def __init__(self, config: dict):
        super().__init__(config)
        for key, supported in EULER_SUPPORTED.items():
            option(config, key, supported)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        x = x.float()  # as diffusers, Euler steps in fp32 whatever the model's dtype
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        derivative = (x - self.denoised(model_output, i, x)) / sigma
        return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestral(KarrasSampler):
    """Euler down to sigma_down, then fresh noise of std sigma_up, where sigma_down^2 + sigma_up^2 =
    sigma_next^2 (k-diffusion's get_ancestral_step with eta = 1: DDPM's ancestral step in sigma terms)."""

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        x = x.float()
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - self.denoised(model_output, i, x)) / sigma
        x = x + derivative * (sigma_down - sigma)
        # drawn on the last step too (where sigma_up = 0), so the generator advances as diffusers'
        noise = gaussian_like(model_output, generator)
        return (x + noise * sigma_up).to(model_output.dtype)
