"""One BK-SDM distillation step, two ways, on the same weights and batch, for `bench train`.

MinisdKD is train.py's step: minisd/kd_step.py's kd_step, the very function train.py's loop calls,
with BK-SDM's recipe (loss weights 1, no caption dropout, no Min-SNR weighting), then backward,
foreach gradient clipping and a fused AdamW step (data loading and logging aside): frozen teacher
in bf16 under no_grad, student in bf16 autocast over fp32 weights, features returned by the U-Net
(no hooks), torch.compile on CUDA, no activation checkpointing, and no host-device sync.

ReferenceKD is the step of BK-SDM's src/kd_train_text_to_image.py as scripts/kd_train.sh runs it
(after diffusers' examples/text_to_image): diffusers U-Nets, features caught by forward hooks keyed
by module name, accelerate's fp16 mixed precision (frozen VAE, text encoder and teacher cast to
fp16; the student's forward in fp16 autocast over fp32 weights, a GradScaler), gradient
checkpointing, torch.optim.AdamW, and the loss read back every step for the progress bar (a host
sync). EMA, which BK-SDM also keeps, is left out of both. On the CPU both run in fp32.
"""

import contextlib

import torch
import torch.nn.functional as F

from minisd.distill import feature_pairs, student_from_teacher
from minisd.kd_step import KDRecipe, kd_step
from minisd.pipeline import Pipeline, default_dtype
from minisd.schedulers import NoiseSchedule
from minisd.table import variant

# BK-SDM's feature-KD module lists (kd_train_text_to_image.py, mapping_layers_tea / _stu)
BK_BASE = ["up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3",
           "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"]
BK_MAPPING = {"sd": (BK_BASE, BK_BASE), "base": (BK_BASE, BK_BASE), "small": (BK_BASE, BK_BASE),
              "tiny": (["down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.1.proj_out",
                        "up_blocks.1", "up_blocks.2", "up_blocks.3"],
                       ["down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.0.proj_out",
                        "up_blocks.0", "up_blocks.1", "up_blocks.2"])}


class MinisdKD:
    def __init__(self, teacher: Pipeline, name: str, compile: bool = False, checkpointing: bool = False,
                 lr: float = 5e-5, recipe: KDRecipe = KDRecipe()):
        self.teacher, self.device = teacher, teacher.device
        cuda = self.device.type == "cuda"
        self.student = student_from_teacher(teacher.unet, variant(teacher.unet.config, name)).train()
        self.student.gradient_checkpointing = checkpointing
        teacher.to(dtype=default_dtype(self.device, training=True))
        self.pairs = feature_pairs(self.student.config, teacher.unet.config)
        self.schedule = NoiseSchedule.from_config(teacher.scheduler_config)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=1e-2, fused=cuda)
        self.model, self.teacher_unet = self.student, teacher.unet
        if compile:
            self.model, self.teacher_unet = torch.compile(self.student), torch.compile(teacher.unet)
        self.recipe = recipe

    def modules(self) -> list:
        return [self.student, self.teacher.unet, self.teacher.vae, self.teacher.text_encoder, self.optimizer]

    def step(self, batch: dict) -> torch.Tensor:
        """One optimizer step on a batch as train.py's loader gives it (images and captions, or cached
        moments and text states); returns the loss, left on the device."""
        losses = kd_step(batch, self.teacher, self.teacher_unet, self.model, self.schedule, self.pairs,
                         self.recipe)
        loss = losses["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def add_hooks(net: torch.nn.Module, memory: dict, names: list[str]) -> None:
    """BK-SDM's add_hook: each named module's output lands in memory[name] on every forward."""
    def keep(name):
        def hook(module, args, output):
            memory[name] = output
        return hook

    for name, module in net.named_modules():
        if name in names:
            module.register_forward_hook(keep(name))


class ReferenceKD:
    def __init__(self, teacher: Pipeline, student, name: str, lr: float = 5e-5):
        """teacher: a minisd pipeline; student: the minisd student U-Net whose weights to start from."""
        from minisd.bench.reference import DDPMScheduler, diffusers_pipeline, diffusers_unet

        self.device = teacher.device
        cuda = self.device.type == "cuda"
        ref = diffusers_pipeline(teacher)
        self.weight_dtype = torch.float16 if cuda else torch.float32  # accelerate's mixed_precision="fp16"
        self.vae, self.text_encoder, self.teacher = (m.to(self.weight_dtype)
                                                     for m in (ref.vae, ref.text_encoder, ref.unet))
        self.student = diffusers_unet(student).float().train().requires_grad_(True)
        self.student.enable_gradient_checkpointing()
        self.noise_scheduler = DDPMScheduler.from_config(teacher.scheduler_config)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda") if cuda else None
        self.autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
        self.layers_teacher, self.layers_student = BK_MAPPING[name]
        self.acts_teacher, self.acts_student = {}, {}
        add_hooks(self.teacher, self.acts_teacher, self.layers_teacher)
        add_hooks(self.student, self.acts_student, self.layers_student)
        self.tokenizer = ref.tokenizer
        self.train_loss = 0.0

    def modules(self) -> list:
        return [self.student, self.teacher, self.vae, self.text_encoder, self.optimizer]

    def step(self, batch: dict) -> torch.Tensor:
        """batch: "pixels" [B, 3, H, W] in [-1, 1] and "input_ids" [B, 77], as BK-SDM's loader gives them."""
        pixels = batch["pixels"].to(self.device)  # accelerate moves batches with blocking copies
        input_ids = batch["input_ids"].to(self.device)
        latents = self.vae.encode(pixels.to(self.weight_dtype)).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(input_ids)[0]
        with self.autocast:
            model_pred = self.student(noisy_latents, timesteps, encoder_hidden_states).sample
        loss_sd = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        with torch.no_grad():
            model_pred_teacher = self.teacher(noisy_latents, timesteps, encoder_hidden_states).sample
        loss_kd_output = F.mse_loss(model_pred.float(), model_pred_teacher.float(), reduction="mean")
        losses_kd_feat = []
        for m_tea, m_stu in zip(self.layers_teacher, self.layers_student):
            a_tea, a_stu = self.acts_teacher[m_tea], self.acts_student[m_stu]
            a_tea = a_tea[0] if isinstance(a_tea, tuple) else a_tea
            a_stu = a_stu[0] if isinstance(a_stu, tuple) else a_stu
            losses_kd_feat.append(F.mse_loss(a_stu.float(), a_tea.detach().float(), reduction="mean"))
        loss = loss_sd + loss_kd_output + sum(losses_kd_feat)
        self.train_loss += loss.detach().item()  # BK-SDM accumulates the logged loss every step
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()
