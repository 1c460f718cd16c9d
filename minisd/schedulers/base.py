"""What every sampler shares: the interface the pipeline calls, timestep spacing, ancestral noise.

A sampler runs one denoising loop (sketch; the pipeline adds guidance):

    sampler.set_timesteps(steps)                      # which timesteps the run visits; clears history
    x = noise * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        out = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], context)
        x = sampler.step(out, i, x, generator)

Every step is told its index i into `timesteps`; nothing is counted behind the caller's back. What
a multi-step method remembers between steps (PNDM's eps history, DPM-Solver's previous x0) is a
plain attribute, cleared by `reset()` (and by `set_timesteps`).
"""

import numpy as np
import torch

from minisd.schedulers.schedule import NoiseSchedule, option

SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, offset: int = 0) -> np.ndarray:
    """The training timesteps a run of `steps` visits, descending, as diffusers spaces them.

    The three spacings are compared in Lin et al. 2023 (arXiv 2305.08891, Table 2):
      linspace: evenly from T-1 down to 0 (not rounded here: Euler keeps the fractions);
      leading:  multiples of T // steps up from 0, plus steps_offset (SD's configs say 1);
      trailing: down from T-1 in strides of T / steps, so the run starts at the noisiest step.
    Computed in numpy, as diffusers does, so that rounding ties break the same way.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, not {steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (num_train_timesteps // steps))[::-1] + offset
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1


def gaussian_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise shaped like x, drawn as diffusers' randn_tensor draws it (so seeds give the same noise):
    on the generator's device, then moved to x's; with a list of generators, one per batch item."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]  # diffusers treats a one-generator list as that generator
    if isinstance(generator, list):
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype)
                           for g in generator])
    else:
        device = x.device if generator is None else generator.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    if noise.device.type == "cpu" and x.device.type == "cuda":
        # a plain copy from pageable memory makes the host wait for the GPU to finish all queued work;
        # from pinned memory the copy is queued like a kernel
        return noise.pin_memory().to(x.device, non_blocking=True)
    return noise.to(x.device)


class Sampler:
    """The interface; subclasses define set_timesteps and step (and override the rest as needed).

    Build samplers with make_sampler, which also drops the keys a live diffusers config marks as
    filled-in defaults (schedule.explicit).
    """

    init_noise_sigma = 1.0  # the std of x at the first timestep, for data of unit variance
    finite_sigmas = False  # True where steps divide by Karras' sigma (schedule.NoiseSchedule.from_config)

    def __init__(self, config: dict, spacing_default: str):
        """spacing_default: the timestep_spacing that the reproduced diffusers class defaults to, used
        where the config lacks the key (SD-v1's PNDM config does: Euler and DPM then space "linspace")."""
        self.schedule = NoiseSchedule.from_config(config, self.finite_sigmas)
        self.spacing = option(config, "timestep_spacing", SPACINGS, default=spacing_default)
        self.steps_offset = config.get("steps_offset", 0)
        self.timesteps: torch.Tensor | None = None

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def spaced(self, steps: int) -> np.ndarray:
        return spaced_timesteps(self.spacing, steps, self.schedule.num_train_timesteps, self.steps_offset)

    def set_timesteps(self, steps: int, device="cpu") -> None:
        raise NotImplementedError

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What the U-Net sees at step i; the identity where x already has unit variance."""
        return x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x at timesteps[i] and the model's output there -> x at the next, less noisy level."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents noised to the level of timesteps[i] (img2img starts its loop there)."""
        return self.schedule.add_noise(x0, noise, self.timesteps[i])

    def reset(self) -> None:
        """Forget what earlier steps left behind, before a new run."""
