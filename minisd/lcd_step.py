"""One step of latent consistency distillation (LCD: Luo et al., arXiv 2310.04378, Algorithm 1) on one
micro-batch, up to its loss, as diffusers' LCM training scripts compute it.

A consistency model f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) (minisd/schedulers/lcm.py) maps any
point of a probability-flow ODE trajectory to the trajectory's origin. LCD teaches a student that property on
the teacher's trajectories, in latent space, one solver step at a time:
1. each sample draws, from its own seed (so a resumed or multi-GPU run draws the same), a point of the
   skipping schedule t_{n+k} (k = T / 50 = 20: timesteps 19, 39, ..., 999), the diffusion noise, its VAE
   posterior draw, and a guidance weight w in [w_min, w_max];
2. the teacher, with classifier-free guidance at scale 1 + w (LCM's formulation: cond + w (cond - uncond)),
   takes one DDIM step from x_{t_{n+k}} to x_{t_n}: the point the ODE reaches k timesteps later;
3. the target network's consistency function at (x_{t_n}, t_n) is the target, the student's at
   (x_{t_{n+k}}, t_{n+k}) the prediction: both should name the same origin. The loss is their pseudo-Huber
   distance, sqrt(d^2 + c^2) - c (near L1 for large errors, smooth at 0), averaged over the latents.
Full LCD conditions the student (and its target, an EMA of it) on w through the U-Net's guidance embedding,
so that sampling needs no CFG pass. LCM-LoRA (arXiv 2311.05556) trains LoRA layers on the teacher's own U-Net
without a w input, and uses the student itself, without grad, as its target.
"""

from dataclasses import dataclass

import torch

from minisd import latent_cache
from minisd.pipeline import Pipeline
from minisd.schedulers import NoiseSchedule
from minisd.schedulers.lcm import boundary_scalings, predicted_x0
from minisd.training import to_device

SALT = 0x1CD  # the LCD draws of a sample come from its seed mixed with this, apart from kd_step's draws


@dataclass(frozen=True)
class LCDRecipe:
    """diffusers' LCM distillation defaults, w's range as the LCM paper's."""
    solver_steps: int = 50  # the DDIM skipping schedule: k = T // 50 = 20 timesteps a solver step
    w_min: float = 3.0
    w_max: float = 15.0
    huber_c: float | None = 0.001  # pseudo-Huber's c; None: the mean squared error
    timestep_scaling: float = 10.0  # of the boundary scalings, as LCMScheduler samples with it


def skipping_schedule(num_train_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The timesteps LCD trains on, ascending: k - 1, 2k - 1, ..., T - 1 with k = T // solver_steps."""
    k = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


def lcd_draws(seeds: torch.Tensor, latent_shape: tuple, recipe: LCDRecipe):
    """For each sample, from its own seed: the index of its point in the skipping schedule, the diffusion
    noise, the noise of its VAE posterior draw, and its guidance weight w. Drawn on the CPU, so the numbers
    do not depend on the device, the rank or the batch a sample lands in."""
    index, noise, eps, w = [], [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(seed ^ SALT)
        index.append(torch.randint(0, recipe.solver_steps, (1,), generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        eps.append(torch.randn(latent_shape, generator=g))
        w.append(recipe.w_min + (recipe.w_max - recipe.w_min) * torch.rand(1, generator=g))
    return torch.cat(index), torch.stack(noise), torch.stack(eps), torch.cat(w)


def predicted_noise(model_output: torch.Tensor, x: torch.Tensor, alpha_bar, prediction_type: str):
    """The noise that the model's output (eps or v) implies at x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar)
    eps."""
    if prediction_type == "epsilon":
        return model_output
    return alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x  # from v


def consistency(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, w, schedule: NoiseSchedule,
                timestep_scaling: float) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) of a U-Net (w: its guidance input, or None)."""
    out = model(x, t, context) if w is None else model(x, t, context, w=w)
    alpha_bar = schedule.alpha_bar(t, x.device).reshape(-1, 1, 1, 1)
    c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in boundary_scalings(t.float(), timestep_scaling))
    return c_skip * x + c_out * predicted_x0(out.float(), x, alpha_bar, schedule.prediction_type)


def lcd_step(batch: dict, teacher: Pipeline, teacher_unet: torch.nn.Module, student: torch.nn.Module,
             target: torch.nn.Module, schedule: NoiseSchedule, uncond_context: torch.Tensor,
             recipe: LCDRecipe = LCDRecipe(), guidance_input: bool = True) -> dict[str, torch.Tensor]:
    """The loss of one micro-batch, {"loss": ...}, left on the device.

    batch: as kd_step's ("pixels" or the cache's "mean", "std", "context"; "text", "seed"). teacher: the
    frozen pipeline (VAE, tokenizer, text encoder). teacher_unet: the frozen teacher U-Net as it runs.
    student: the U-Net that learns, as it runs; target: the network whose consistency function gives the
    target (full LCD: the student's EMA; LCM-LoRA: the student itself), run without grad. uncond_context:
    the empty prompt's text states [1, 77, D]. guidance_input: the student and target take w (their
    guidance embedding); LCM-LoRA's do not.
    """
    device = teacher.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        mean, std = latent_cache.posterior_moments(batch, teacher, device)
        draws = lcd_draws(batch["seed"], mean.shape[1:], recipe)
        index, noise, eps, w = (to_device(v, device) for v in draws)
        latents = (mean.float() + std.float() * eps) * teacher.vae.scaling_factor
        if "context" in batch:
            context = latent_cache.cached_text_states(batch, batch["text"], teacher, device)
        else:
            context = teacher.text_encoder(to_device(teacher.tokenizer(batch["text"]), device))
        context = context.float()
        schedule_steps = skipping_schedule(schedule.num_train_timesteps, recipe.solver_steps).to(device)
        start = schedule_steps[index]  # t_{n+k}
        end = (start - (schedule.num_train_timesteps // recipe.solver_steps)).clamp(min=0)  # t_n
        noisy = schedule.add_noise(latents, noise, start)

        # the teacher's guided DDIM step from t_{n+k} to t_n, conditional and unconditional in one batch
        with autocast:
            both = teacher_unet(torch.cat([noisy, noisy]).to(teacher.dtype), torch.cat([start, start]),
                                torch.cat([context, uncond_context.expand_as(context)]).to(teacher.dtype))
        cond, uncond = both.float().chunk(2)
        a_start = schedule.alpha_bar(start, device).reshape(-1, 1, 1, 1)
        guide = w.reshape(-1, 1, 1, 1)
        x0 = [predicted_x0(out, noisy, a_start, schedule.prediction_type) for out in (cond, uncond)]
        e = [predicted_noise(out, noisy, a_start, schedule.prediction_type) for out in (cond, uncond)]
        x0, e = x0[0] + guide * (x0[0] - x0[1]), e[0] + guide * (e[0] - e[1])
        a_end = schedule.alpha_bar(end, device).reshape(-1, 1, 1, 1)
        x_prev = a_end**0.5 * x0 + (1 - a_end) ** 0.5 * e

        w_input = w if guidance_input else None
        with autocast:
            goal = consistency(target, x_prev, end, context, w_input, schedule, recipe.timestep_scaling)

    with autocast:
        prediction = consistency(student, noisy, start, context, w_input, schedule, recipe.timestep_scaling)
    diff = prediction.float() - goal.float()
    if recipe.huber_c is None:
        loss = diff.square().mean()
    else:
        loss = ((diff.square() + recipe.huber_c**2).sqrt() - recipe.huber_c).mean()
    return {"loss": loss}
