"""Multistep latent consistency sampling (Luo et al. 2023, arXiv 2310.04378), as diffusers' LCMScheduler.

A consistency model f maps any point x_t of a probability-flow ODE trajectory to the trajectory's
origin in one call. It is parameterised so that it is the identity at t = 0, whatever the network
says (the boundary condition of Consistency Models, Song et al. 2023, arXiv 2303.01469, sec. 3):

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)

x0_hat is the U-Net's clean-latent estimate, read from its eps or v as DDIM reads it, and

    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),    c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with sigma_data = 0.5 and s = timestep_scaling = 10 (LCM's released code and diffusers: no sigma_data
factor in c_out and no epsilon offset, unlike the consistency-models paper). With s = 10, c_skip is
below 1e-4 from t = 5 on: at the timesteps LCM samples (19 and up) f is x0_hat all but exactly, and
the scalings only pin f(x, 0) = x for the distillation.

Multistep sampling (Consistency Models, Algorithm 1) alternates a jump to x0 and a re-noising to the
next, lower timestep with fresh noise from the generator; the last step returns the jump itself:

    x0 = f(x_t, t);   x_next = sqrt(alpha_bar_next) x0 + sqrt(1 - alpha_bar_next) z,   z ~ N(0, I)

Latent consistency distillation trains f only on the timesteps of a skipping DDIM schedule, k =
T // original_inference_steps apart (50 steps: k = 20, timesteps 999, 979, ..., 19). Sampling picks its
`steps` from those, evenly by index (4 steps: 999, 759, 499, 259).

No classifier-free guidance pass belongs here: a U-Net distilled with guidance takes the guidance
weight as an input (UNet(..., w=)), and an LCM-LoRA is sampled with guidance off or low (docs/sampling.md).
"""

import numpy as np
import torch

from minisd.schedulers.base import Sampler, gaussian_like
from minisd.schedulers.schedule import option

SIGMA_DATA = 0.5  # the data's std that the scalings assume (Consistency Models, as EDM's sigma_data)
TIMESTEP_SCALING = 10.0  # diffusers' LCMScheduler default, as LCM's training scripts use it


def boundary_scalings(t, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out) at discrete timesteps t (a number, or a tensor such as a batch's [B] timesteps):
    f(x_t, t) = c_skip x_t + c_out x0_hat. c_skip(0) = 1 and c_out(0) = 0, the boundary condition."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_x0(model_output: torch.Tensor, x: torch.Tensor, alpha_bar,
                 prediction_type: str) -> torch.Tensor:
    """The clean latents that the model's output (eps or v) implies at
    x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    if prediction_type == "epsilon":
        return (x - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
    # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)
    return alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * model_output


def lcm_timesteps(steps: int, original_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The `steps` timesteps of a run, descending: evenly by index from the distillation's skipping
    schedule (k = T // original_steps: k - 1, 2k - 1, ..., T - 1)."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM samples 1 to original_inference_steps = {original_steps} steps (the timesteps "
                         f"it was distilled on), not {steps}")
    k = num_train_timesteps // original_steps
    skipping = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return skipping[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


# LCMScheduler's own defaults for the noise schedule: SD's (the other samplers default to DDPM's linear betas)
LCM_DEFAULTS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class LCM(Sampler):
    def __init__(self, config: dict):
        config = {**LCM_DEFAULTS, **config}
        super().__init__(config, spacing_default="leading")  # read for the check only: LCM ignores it
        option(config, "thresholding", (False,))  # Imagen's dynamic thresholding is not implemented
        self.clip_x0 = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        self.original_steps = config.get("original_inference_steps", 50)
        self.timestep_scaling = config.get("timestep_scaling", TIMESTEP_SCALING)
        self.timestep_values: list[int] = []  # `timesteps` as Python ints

    def set_timesteps(self, steps: int, device="cpu") -> None:
        t = lcm_timesteps(steps, self.original_steps, self.schedule.num_train_timesteps)
        self.timesteps = torch.from_numpy(t.copy()).to(device)
        self.timestep_values = t.tolist()  # read by step(): no device read (a host-device sync) per step

    def consistency(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """f(x, t) at timesteps[i]: the consistency model's estimate of the clean latents."""
        t = self.timestep_values[i]
        x0 = predicted_x0(model_output, x, self.schedule.alphas_cumprod[t], self.prediction_type)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        # from a tensor timestep, in float32, as diffusers computes them (the same roundings in fp16)
        c_skip, c_out = boundary_scalings(torch.tensor(t), self.timestep_scaling)
        return c_out * x0 + c_skip * x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        x0 = self.consistency(model_output, i, x)
        if i == len(self.timestep_values) - 1:
            return x0
        alpha_bar_next = self.schedule.alphas_cumprod[self.timestep_values[i + 1]]
        return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * gaussian_like(x0, generator)
