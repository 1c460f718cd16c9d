"""One step of BK-SDM's distillation on one micro-batch (Kim et al., arXiv 2305.15798, sec. 3.2), up to its
loss.

train.py's loop and `python -m minisd.bench train` both call `kd_step`, so the benchmark times what a run
does:
1. each sample draws its timestep, its diffusion noise and its VAE posterior sample from its own seed
   (`per_sample_noise`), and its caption may be dropped for classifier-free guidance (`drop_captions`);
2. the noisy latents go through the frozen teacher (no grad) and the student, each returning the features its
   taps name (minisd/distill.py pairs them, read off the table);
3. the loss terms: the denoising task (Min-SNR-gamma weighted if asked), output KD and feature KD, and their
   weighted sum (minisd/distill.py's kd_losses and total_loss).
The caller calls backward() on the sum, and steps the optimizer.
"""

import contextlib
from dataclasses import dataclass

import torch

from minisd import latent_cache
from minisd.distill import kd_losses, total_loss
from minisd.pipeline import Pipeline
from minisd.schedulers import NoiseSchedule
from minisd.training import to_device


@dataclass(frozen=True)
class KDRecipe:
    """What a step's loss is made of, beside the models: BK-SDM's defaults (all weights 1, nothing else)."""
    lambda_sd: float = 1.0  # the denoising task
    lambda_out: float = 1.0  # output-level KD
    lambda_feat: float = 1.0  # feature-level KD
    # Min-SNR-gamma weighting of the task loss (arXiv 2303.09556); None: uniform
    snr_gamma: float | None = None
    caption_dropout: float = 0.0  # share of captions replaced by the empty prompt (SD: 0.1)


def per_sample_noise(seeds: torch.Tensor, latent_shape: tuple, num_train_timesteps: int):
    """For each sample, from its own seed (minisd/data.py's sample_seed): a timestep uniform over
    0..T-1 (BK-SDM), the diffusion noise, and the noise of its VAE posterior draw. Drawn on the CPU,
    so the numbers do not depend on the device, the rank or the batch a sample lands in."""
    t, noise, eps = [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(seed)
        t.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        eps.append(torch.randn(latent_shape, generator=g))
    return torch.cat(t), torch.stack(noise), torch.stack(eps)


def drop_captions(texts: list[str], seeds: torch.Tensor, p: float) -> list[str]:
    """Each caption replaced by the empty prompt with probability p, drawn from its sample's seed, so a
    resumed run drops the same ones (SD trained with 10% dropped, which classifier-free guidance needs)."""
    if not p:
        return texts
    drawn = [torch.rand((), generator=torch.Generator().manual_seed(seed ^ 0x5EED)).item()
             for seed in seeds.tolist()]
    return ["" if u < p else text for text, u in zip(texts, drawn)]


def kd_step(batch: dict, teacher: Pipeline, teacher_unet: torch.nn.Module | None, student: torch.nn.Module,
            schedule: NoiseSchedule, pairs: list[tuple[str, str]], recipe: KDRecipe = KDRecipe(),
            train_text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch: {"loss": the weighted sum, "sd", "out", "feat"}, left on the device.

    batch: as train.py's loader gives it: "pixels", or the cache's "mean", "std" and "context"; "text" and
    "seed"; optionally "loss_weight" [B], each sample's weight in the task loss (minisd/dreambooth.py).
    teacher: the frozen pipeline (its VAE, tokenizer and text encoder; bf16 on CUDA).
    teacher_unet: the teacher's U-Net as it runs (compiled or not); None for plain training, the task loss
    alone. student: the U-Net that learns, as it runs (DDP-wrapped or compiled): fp32 weights, bf16 autocast
    on CUDA. pairs: distill.feature_pairs, (teacher tap, student tap); empty for plain training.
    train_text_encoder: the text encoder learns too (train.py --plain --train-text-encoder), so it runs with
    grad.
    """
    device = teacher.device
    with torch.no_grad():
        mean, std = latent_cache.posterior_moments(batch, teacher, device)  # from the cache, or the VAE
        t, noise, eps = (to_device(v, device) for v in
                         per_sample_noise(batch["seed"], mean.shape[1:], schedule.num_train_timesteps))
        latents = (mean + std * eps.to(teacher.dtype)).float() * teacher.vae.scaling_factor
        texts = drop_captions(batch["text"], batch["seed"], recipe.caption_dropout)
        if "context" in batch:
            context = latent_cache.cached_text_states(batch, texts, teacher, device)
        else:
            with torch.enable_grad() if train_text_encoder else contextlib.nullcontext():
                context = teacher.text_encoder(to_device(teacher.tokenizer(texts), device))
        noisy = schedule.add_noise(latents, noise, t)
        target = noise if schedule.prediction_type == "epsilon" else schedule.velocity(latents, noise, t)
        teacher_out, teacher_feats = (None, {}) if teacher_unet is None else \
            teacher_unet(noisy.to(teacher.dtype), t, context, taps=[a for a, _ in pairs])
    autocast = torch.autocast("cuda",
                              dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        student_out, student_feats = student(noisy, t, context.float(), taps=[b for _, b in pairs])
        weights = None if recipe.snr_gamma is None else schedule.min_snr_weights(t, recipe.snr_gamma)
        if "loss_weight" in batch:  # per-sample weights of the task loss (DreamBooth's prior preservation)
            weights = batch["loss_weight"].to(device) * (1 if weights is None else weights)
        losses = kd_losses(student_out, target, teacher_out, student_feats, teacher_feats, pairs, weights)
        loss = total_loss(losses, recipe.lambda_sd, recipe.lambda_out, recipe.lambda_feat)
    return {"loss": loss, **losses}
