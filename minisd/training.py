"""The parts of train.py's loop that are not the KD step (minisd/kd_step.py): distributed setup,
learning-rate schedule, EMA, atomic checkpoints that resume exactly, and a loss plot.

A checkpoint is a folder `checkpoint-{step:07d}/` under the run's output folder:
    unet/                  the student, diffusers layout (diffusers and sample.py load it)
    ema_unet/              the EMA student, when --ema-decay is set
    vae/ text_encoder/ tokenizer/ scheduler/  links to the teacher's, written once in the output folder
    model_index.json       so the checkpoint folder is a whole pipeline
    training_state.pt      optimizer, step, data position, arguments
It is written under a temporary name and renamed, so a kill during a save leaves the previous
checkpoint as it was; only the last `keep` are kept.
"""

import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from minisd.checkpoints.diffusers import (
    load_unet,
    model_index,
    save_text_encoder,
    save_tokenizer,
    save_unet,
    save_vae,
    write_json,
)
from minisd.checkpoints.files import write_checkpoint
from minisd.unet import UNet

SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (NCCL on CUDA, gloo on CPU), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", "0")), world, device


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x (on the CPU) on `device`, without a host-device sync: a plain copy from pageable memory to a GPU
    makes the host wait for all queued GPU work, while a copy from pinned memory is queued like a kernel."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def lr_at(step: int, base: float, schedule: str, warmup: int, total: int) -> float:
    """BK-SDM trains at a constant 5e-5; linear warm-up and cosine decay are options."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


class EMA:
    """An exponential moving average of the student's weights, kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.float() for p in model.state_dict().values()]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1 - self.decay)

    def as_model(self, like: UNet) -> UNet:
        """A U-Net like `like` holding the averaged weights."""
        with torch.device("meta"):
            model = UNet(like.table)
        model.load_state_dict({k: v.to(like.conv_in.weight.dtype) for k, v in self.shadow.items()}, assign=True)
        return model.eval()


def write_shared(teacher, out: Path) -> None:
    """The teacher's VAE, text encoder, tokenizer and scheduler, once, beside the checkpoints."""
    if all((out / name).is_dir() for name in SHARED):
        return
    save_vae(teacher.vae, out / "vae")
    save_text_encoder(teacher.text_encoder, out / "text_encoder")
    save_tokenizer(teacher.tokenizer, out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", teacher.scheduler_config)


def save_checkpoint(out: Path, step: int, student, ema: EMA | None, state: dict, keep: int,
                    scheduler_class: str, text_encoder=None) -> Path:
    """text_encoder: one trained with the U-Net (train.py --train-text-encoder), saved in the checkpoint, not linked."""
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_unet(student, tmp / "unet")
    if ema is not None:
        save_unet(ema.as_model(student), tmp / "ema_unet")
    if text_encoder is not None:
        save_text_encoder(text_encoder, tmp / "text_encoder")
    for name in SHARED:
        if not (tmp / name).exists():
            os.symlink(Path("..") / name, tmp / name, target_is_directory=True)
    write_json(tmp / "model_index.json", model_index(scheduler_class))
    write_checkpoint(tmp / "training_state.pt", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the checkpoint appears whole, or not at all
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones still have their temporary name)."""
    return sorted(p for p in out.glob("checkpoint-*") if (p / "training_state.pt").is_file())


def load_checkpoint(path: Path, device) -> tuple:
    """(student U-Net, EMA weights or None, training state) of a checkpoint folder."""
    student = load_unet(path / "unet", device=device)
    ema = load_unet(path / "ema_unet", device=device).state_dict() if (path / "ema_unet").is_dir() else None
    state = torch.load(path / "training_state.pt", map_location=device, weights_only=True)
    return student, ema, state


def plot_losses(rows: list[dict], path: Path, keys=("loss", "sd", "out", "feat")) -> None:
    """A PNG line plot of the logged loss terms against the step (log scale), drawn with PIL. A term that is 0
    throughout (out and feat of a --plain run) is left out: on a log scale it would squash the others flat."""
    w, h, pad = 800, 480, 50
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    colours = {"loss": "black", "sd": "blue", "out": "orange", "feat": "green"}
    steps = [r["step"] for r in rows]
    keys = [k for k in keys if k in rows[0] and any(r.get(k, 0) > 0 for r in rows)]
    values = [math.log10(max(r[k], 1e-12)) for r in rows for k in keys]
    if len(steps) < 2 or not values:
        return
    lo, hi, s0, s1 = min(values), max(values), steps[0], steps[-1]

    def xy(step, value):
        return (pad + (w - 2 * pad) * (step - s0) / max(1, s1 - s0),
                h - pad - (h - 2 * pad) * (math.log10(max(value, 1e-12)) - lo) / max(1e-9, hi - lo))

    draw.rectangle([pad, pad, w - pad, h - pad], outline="grey")
    for i, key in enumerate(keys):
        draw.line([xy(r["step"], r[key]) for r in rows], fill=colours[key], width=2)
        draw.text((pad + 10 + 80 * i, 10), key, fill=colours[key])
    draw.text((pad, h - pad + 10), f"step {s0}", fill="black")
    draw.text((w - pad - 80, h - pad + 10), f"step {s1}", fill="black")
    draw.text((5, pad), f"{10 ** hi:.3g}", fill="black")
    draw.text((5, h - pad - 10), f"{10 ** lo:.3g}", fill="black")
    image.save(path)
