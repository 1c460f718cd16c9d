"""The parts of train.py's loop around the KD step (minisd/kd_step.py): distributed setup, the learning-rate
schedule, EMA, the state a run goes on from, the batches and the data position, the loss log, stop signals,
atomic checkpoints that resume exactly, and a loss plot.

A checkpoint is a folder `checkpoint-{step:07d}/` under the run's output folder:
    unet/                  the student, diffusers layout (diffusers and sample.py load it)
    ema_unet/              the EMA student, when --ema-decay is set
    vae/ text_encoder/ tokenizer/ scheduler/  links to the teacher's, written once in the output folder
    model_index.json       so the checkpoint folder is a whole pipeline
    training_state.pt      optimizer, step, data position, arguments
It is written under a temporary name and renamed, so a kill during a save leaves the previous
checkpoint as it was; only the last `keep` are kept.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from minisd.checkpoints.diffusers import (
    load_text_encoder,
    load_unet,
    model_index,
    save_text_encoder,
    save_tokenizer,
    save_unet,
    save_vae,
    write_json,
)
from minisd.checkpoints.files import write_checkpoint
from minisd.data import ResumableSampler
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
            model = UNet(like.config)
        model.load_state_dict({k: v.to(like.conv_in.weight.dtype) for k, v in self.shadow.items()},
                              assign=True)
        return model.eval()


def write_shared(teacher, out: Path) -> None:
    """The teacher's VAE, text encoder, tokenizer and scheduler, once, beside the checkpoints."""
    if all((out / name).is_dir() for name in SHARED):
        return
    save_vae(teacher.vae, out / "vae")
    save_text_encoder(teacher.text_encoder, out / "text_encoder")
    save_tokenizer(teacher.tokenizer, out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", teacher.scheduler_config)


@dataclass
class TrainState:
    """What a run goes on from, and what a checkpoint saves: the weights that learn, the optimizer, the step,
    and the data position (the epoch, and the samples this rank took in it), so that a resumed run takes the
    batch that the run it resumes would have taken next."""
    student: UNet
    optimizer: torch.optim.Optimizer
    ema: EMA | None = None
    # one that learns with the U-Net (train.py --train-text-encoder)
    text_encoder: torch.nn.Module | None = None
    step: int = 0
    epoch: int = 0
    position: int = 0

    def restore(self, path: Path, weights: UNet, ema_weights: dict | None, saved: dict) -> None:
        """Go on from the checkpoint at `path`, whose parts load_checkpoint(path) has read."""
        self.student.load_state_dict(weights.state_dict())
        if self.text_encoder is not None:
            trained = load_text_encoder(path / "text_encoder",
                                        device=next(self.text_encoder.parameters()).device)
            self.text_encoder.load_state_dict(trained.state_dict())
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema is not None and ema_weights is not None:
            self.ema.shadow = {k: v.float() for k, v in ema_weights.items()}
        self.step, self.epoch, self.position = saved["step"], saved["epoch"], saved["position"]


def save_checkpoint(out: Path, state: TrainState, keep: int, scheduler_class: str, run: dict) -> Path:
    """state as checkpoint-{step}/ under `out`; `run` (what was trained, and how) goes into
    training_state.pt."""
    final = out / f"checkpoint-{state.step:07d}"
    tmp = out / f".tmp-checkpoint-{state.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_unet(state.student, tmp / "unet")
    if state.ema is not None:
        save_unet(state.ema.as_model(state.student), tmp / "ema_unet")
    if state.text_encoder is not None:  # trained, so saved in the checkpoint, not linked
        save_text_encoder(state.text_encoder, tmp / "text_encoder")
    for name in SHARED:
        if not (tmp / name).exists():
            os.symlink(Path("..") / name, tmp / name, target_is_directory=True)
    write_json(tmp / "model_index.json", model_index(scheduler_class))
    saved = dict(step=state.step, epoch=state.epoch, position=state.position,
                 optimizer=state.optimizer.state_dict(), **run)
    write_checkpoint(tmp / "training_state.pt", saved)
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


def batches(loader, state: TrainState):
    """The loader's batches, epoch after epoch, from where `state` is (a resumed run's next batch) without
    end. state.epoch and state.position follow them: the samples this rank took in the epoch, whole batches,
    as the loader draws ahead of the loop. A batch whose images all failed to load (None) is counted and
    passed over."""
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.set_state(state.epoch, state.position)
    else:  # a stream of tar shards skips what this rank already took
        loader.dataset.set_state(state.epoch, state.position, loader.batch_size)
    stream = iter(loader)
    while True:
        try:
            batch = next(stream)
        except StopIteration:  # one pass is one epoch; the loader starts the next by itself
            state.epoch, state.position, stream = state.epoch + 1, 0, iter(loader)
            continue
        state.position += loader.batch_size
        if batch is not None:
            yield batch


class LossMeter:
    """The loss terms summed on the device over the steps since the last log row, so that no step waits for
    the GPU; read() gives their means, over all ranks, and the samples per second since the last read."""
    TERMS = ("loss", "sd", "out", "feat")

    def __init__(self, device: torch.device, world: int):
        self.sums, self.world = torch.zeros(len(self.TERMS), device=device), world
        self.steps, self.samples, self.start = 0, 0, time.time()

    def add(self, losses: dict[str, torch.Tensor], accum: int, samples: int) -> None:
        """One micro-batch's terms (kd_step's), each 1/accum of its step's; `samples` over all ranks."""
        self.sums += torch.stack([losses[k].detach() for k in self.TERMS]) / accum
        self.samples += samples

    def read(self) -> tuple[dict[str, float], float]:
        """The means over the steps since the last read (fewer than --log-steps after a resume or at the end),
        and the samples per second; then starts anew."""
        if self.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world
        means = dict(zip(self.TERMS, (self.sums / self.steps).tolist()))
        now = time.time()
        rate = self.samples / (now - self.start)
        self.sums.zero_()
        self.steps, self.samples, self.start = 0, 0, now
        return means, rate


class RunLog:
    """Rank 0's record of a run: rows appended to log.jsonl (a resumed run goes on in the same file), the
    progress bar and its figures, and `report` (TensorBoard or wandb) if given; on other ranks it writes
    nothing."""
    SHOWN = ("sd", "out", "feat", "samples_per_s", "peak_mem_gb")

    def __init__(self, out: Path, rank: int, total: int, initial: int, desc: str, report=None):
        self.out, self.report = out, report
        self.file = open(out / "log.jsonl", "a") if rank == 0 else None
        self.bar = tqdm(total=total, initial=initial, disable=rank != 0, desc=desc)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in self.SHOWN})
        if self.report is not None:
            self.report(row)

    def close(self) -> None:
        """Closes the file and draws the whole run's losses (resumed parts too) into losses.png."""
        if self.file is None:
            return
        self.bar.close()
        self.file.close()
        plot_losses([json.loads(line) for line in open(self.out / "log.jsonl")], self.out / "losses.png")


@contextlib.contextmanager
def stop_signals():
    """A list that Ctrl-C or SIGTERM appends to, so that the loop can finish its step, save and exit. The
    handlers that were there before come back on exit, as train.main may run inside another program (the
    tests)."""
    stop = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank if it is on any (a signal may reach only some processes), so that all stop
    together."""
    flag = torch.tensor([float(flag)], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
