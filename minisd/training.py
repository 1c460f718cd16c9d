"""The parts of a training loop around its step, shared by train.py (around the KD step, minisd/kd_step.py)
and train_vae.py: distributed setup, the learning-rate schedule, EMA, the run folder and the configuration it
records, the state a run goes on from, the batches and the data position, the loss log, stop signals, atomic
checkpoints that resume exactly and are only written from healthy weights, and a loss plot.

A checkpoint is a folder `checkpoint-{step:07d}/` under the run's output folder:
    unet/                  the student, diffusers layout (diffusers and sample.py load it)
    ema_unet/              the EMA student, when --ema-decay is set
    text_encoder/          when it learns too (train.py --train-text-encoder); else a link, as below
    vae/ text_encoder/ tokenizer/ scheduler/  links to the teacher's, written once in the output folder
    model_index.json       so the checkpoint folder is a whole pipeline
    training_state.pt      optimizer, step, data position, arguments
(train_vae.py's hold vae/ and training_state.pt.) It is written under a temporary name and renamed, so a kill
during a save leaves the previous checkpoint as it was; only the last `keep` are kept.

What goes wrong in a long run must not cost the work done: weights that are not finite are never saved (the
run stops, naming the last good checkpoint), a failed save (a full disk) is retried once with the state kept
in memory, and a data set that yields no batch stops the run instead of spinning.
"""

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from tqdm.auto import tqdm

from minisd.checkpoints.diffusers import (
    load_text_encoder,
    load_unet,
    load_vae,
    model_index,
    save_text_encoder,
    save_tokenizer,
    save_unet,
    save_vae,
    write_json,
)
from minisd.checkpoints.files import read_checkpoint, read_json, write_checkpoint
from minisd.checkpoints.lora_files import WEIGHT_NAME as LORA_WEIGHTS
from minisd.checkpoints.lora_files import read_lora, write_lora
from minisd.cli import UsageError, check_writable_folder
from minisd import latent_cache
from minisd.data import ResumableSampler, collate, make_loader, open_dataset, read_metadata
from minisd.images import grid
from minisd.lora import lora_layers, lora_modules
from minisd.pipeline import Pipeline
from minisd.unet import UNet

SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")


def whole(load):
    """Restores a model from a checkpoint folder that `load` reads (diffusers layout)."""
    def restore(model: torch.nn.Module, folder: Path) -> None:
        model.load_state_dict(load(folder, device=next(model.parameters()).device).state_dict())
    return restore


def lora_part(component: str):
    """(save, restore) of a model's LoRA layers alone (dreambooth.py --lora), as a diffusers-layout
    pytorch_lora_weights.safetensors that sample.py --lora and diffusers' load_lora_weights read too."""
    def save(model: torch.nn.Module, folder: Path) -> None:
        path = folder / f"{LORA_WEIGHTS}.safetensors"
        write_lora(path, {component: lora_layers(model)}, {component: model})

    def restore(model: torch.nn.Module, folder: Path) -> None:
        layers = lora_modules(model)
        with torch.no_grad():
            for name, update in read_lora(folder, {component: model})[component].items():
                layers[name].down.weight.copy_(update.down)
                layers[name].up.weight.copy_(update.up)
    return save, restore


# how each model that learns is saved in, and restored from, its checkpoint folder (the folder's name)
SAVE = {"unet": save_unet, "text_encoder": save_text_encoder, "vae": save_vae,
        "unet_lora": lora_part("unet")[0], "text_encoder_lora": lora_part("text_encoder")[0]}
RESTORE = {"unet": whole(load_unet), "text_encoder": whole(load_text_encoder), "vae": whole(load_vae),
           "unet_lora": lora_part("unet")[1], "text_encoder_lora": lora_part("text_encoder")[1]}


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a save that failed twice, data that yields no batch): the
    script prints the message on a line of its own, naming the last good checkpoint, and exits with code 1."""


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


def source(value):
    """A path-like run setting as one name: an existing local path resolved (so `teacher-init` given in
    /work and `/work/teacher-init` are the same run); anything else (a hub id, a number) as it is."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def open_run(out: Path, config: dict, overwrite: bool, outputs: tuple[str, ...], write: bool = True) -> None:
    """The run folder `out`, checked before any work: writable, and holding this run or none.

    `config` is what defines the run (teacher, variant, data, resolution...), recorded in out/run.json. A
    re-run with the same one goes on from the last checkpoint; a different one is refused with the difference
    named, as its checkpoints, shared parts and log would mix with the other run's, unless `overwrite`, which
    first removes the old run's `outputs` (glob patterns; nothing else in the folder is touched). `write`:
    False on all ranks but rank 0, which alone writes."""
    if write:
        check_writable_folder(out)
    recorded = out / "run.json"
    config = {key: source(value) for key, value in config.items()}
    if overwrite and write:
        for pattern in outputs:
            for path in out.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif recorded.is_file() and not overwrite:
        before = read_json(recorded)
        differ = [f"{key} {before.get(key)!r} there, {value!r} here" for key, value in config.items()
                  if source(before.get(key)) != value]
        if differ:
            raise UsageError(f"--out {out} holds another run ({'; '.join(differ)}): give another --out, or "
                             f"--overwrite to start {out} afresh")
    if write:
        write_json(recorded, config)


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
    """What a run goes on from, and what a checkpoint saves: the models that learn, the optimizer, the step,
    and the data position (the epoch, and the samples this rank took in it), so that a resumed run takes the
    batch that the run it resumes would have taken next."""
    # the models that learn, by the checkpoint folder each is saved in (a key of SAVE): train.py's "unet"
    # (and "text_encoder" with --train-text-encoder), train_vae.py's "vae", dreambooth.py's "unet" or
    # "unet_lora" (the LoRA layers alone) and "text_encoder" or "text_encoder_lora"
    models: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    ema: EMA | None = None  # of models["unet"]
    step: int = 0
    epoch: int = 0
    position: int = 0

    def restore(self, path: Path, saved: dict) -> None:
        """Go on from the checkpoint at `path`, whose training_state.pt is `saved`."""
        for name, model in self.models.items():
            RESTORE[name](model, path / name)
        if self.ema is not None and (path / "ema_unet").is_dir():
            self.ema.shadow = {k: v.float() for k, v in load_unet(path / "ema_unet").state_dict().items()}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.epoch, self.position = saved["step"], saved["epoch"], saved["position"]

    def weights_are_finite(self) -> bool:
        params = [p.detach() for model in self.models.values() for p in model.parameters()]
        return bool(torch.stack([p.isfinite().all() for p in params]).all())


def save_checkpoint(out: Path, state: TrainState, keep: int, run: dict, scheduler_class: str | None = None
                    ) -> Path:
    """state as checkpoint-{step}/ under `out`; `run` (what was trained, and how) goes into
    training_state.pt. With `scheduler_class` the checkpoint is a whole pipeline: the parts that did not learn
    are links to the ones write_shared wrote. A failed write leaves no temporary folder behind."""
    final = out / f"checkpoint-{state.step:07d}"
    tmp = out / f".tmp-checkpoint-{state.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, model in state.models.items():
            SAVE[name](model, tmp / name)
        if state.ema is not None:
            save_unet(state.ema.as_model(state.models["unet"]), tmp / "ema_unet")
        if scheduler_class is not None:
            for name in SHARED:
                if not (tmp / name).exists():
                    os.symlink(Path("..") / name, tmp / name, target_is_directory=True)
            write_json(tmp / "model_index.json", model_index(scheduler_class))
        saved = dict(step=state.step, epoch=state.epoch, position=state.position,
                     optimizer=state.optimizer.state_dict(), **run)
        write_checkpoint(tmp / "training_state.pt", saved)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears whole, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


# What a failed write raises: the OS's error; safetensors' writer, which reports the OS error in its message
# ("... I/O error: No space left on device (os error 28)"); torch.save's zip writer, a RuntimeError
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_failure(e: Exception, out: Path) -> str | None:
    """The reason a checkpoint write failed, in one line (with what to do when the disk is full), or None if
    `e` is not a failed write (a RuntimeError from anything but torch.save's writer is a bug, not a full
    disk)."""
    if isinstance(e, OSError):
        reason, full = f"{e.strerror or e} ({e.filename or out})", e.errno == errno.ENOSPC
    elif isinstance(e, SafetensorError) or "PytorchStreamWriter" in str(e) or "file write failed" in str(e):
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        full = f"(os error {errno.ENOSPC})" in reason
    else:
        return None
    return reason + ("; free some space there" if full else "")


class Checkpoints:
    """A run's saves: only from healthy weights, and a failed one is retried once before the run gives up.

    Healthy: every weight finite, and `probe()` (the model's output on a fixed input) finite too, as an
    overflowing learning rate leaves weights of ~1e30 that are finite yet draw nothing. The loss that the log
    checks was computed before the step's update, so it cannot vouch for the weights the step left.

    A save that fails (a full disk, a folder made read-only) loses nothing yet: the state is still in memory.
    The run says so and goes on; the next save is the retry (at once, if it was the last one). A second
    failure in a row stops the run, naming the last good checkpoint."""

    def __init__(self, out: Path, keep: int, run: dict, program: str, scheduler_class: str | None = None):
        self.out, self.keep, self.run, self.program = out, keep, run, program
        self.scheduler_class, self.failed = scheduler_class, False

    def last(self) -> str:
        found = checkpoints(self.out)
        return str(found[-1]) if found else "none (none saved yet)"

    def save(self, state: TrainState, probe=None, final: bool = False) -> None:
        """Save `state` unless its step is saved already; raises TrainingError for unhealthy weights or a
        second failed save."""
        if (self.out / f"checkpoint-{state.step:07d}").is_dir():
            return
        with torch.no_grad():
            healthy = state.weights_are_finite() and (probe is None or bool(probe().isfinite().all()))
        if not healthy:
            raise TrainingError(f"the weights after step {state.step} are not finite, or give a non-finite "
                                f"output: not saved. The last good checkpoint is {self.last()}. Try a lower "
                                "--lr, or --max-grad-norm.")
        try:
            save_checkpoint(self.out, state, self.keep, self.run, self.scheduler_class)
        except WRITE_ERRORS as e:
            if not (failure := write_failure(e, self.out)):
                raise
            where = f"checkpoint-{state.step:07d} in {self.out}: {failure}"
            if self.failed:
                raise TrainingError(f"could not save {where}, again: stopped. The last good checkpoint is "
                                    f"{self.last()}.") from None
            self.failed = True
            retry = "retrying now." if final else "the next save retries."
            tqdm.write(f"{self.program}: warning: could not save {where}. The training state is kept in "
                       f"memory; {retry}", file=sys.stderr)
            if final:
                self.save(state, probe, final)
            return
        self.failed = False


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones still have their temporary name)."""
    return sorted(p for p in out.glob("checkpoint-*") if (p / "training_state.pt").is_file())


def read_training_state(path: Path) -> dict:
    """A checkpoint's training_state.pt (on the CPU: the optimizer's load_state_dict moves its state to the
    weights' device), read as weights only, so a planted file cannot run code."""
    if not (path / "training_state.pt").is_file():
        raise UsageError(f"--resume {path} is not a checkpoint folder (no training_state.pt in it)")
    return read_checkpoint(path / "training_state.pt")


def check_one_batch(data, path, batch_size: int, world: int = 1) -> None:
    """An image folder must hold one batch per process at least, or no epoch would yield one. (A stream of
    tar shards has no length: batches() notices an epoch without a batch instead.)"""
    if hasattr(data, "__len__") and len(data) < batch_size * world:
        raise UsageError(f"--data {path} holds {len(data)} images, fewer than one batch (--batch-size "
                         f"{batch_size} x {world} processes): add images or lower --batch-size")


def open_data(path: str, resolution: int, batch_size: int, random_crop: bool = False, flip: bool = True,
              seed: int = 1234, cache: Path | None = None, rank: int = 0, world: int = 1):
    """The data set at `path` (an image folder or tar shards), opened (its metadata read and counted) before
    any model loads, so that a bad --data costs one line; None with a latent `cache`, which open_loader
    builds from the metadata once the teacher is there."""
    if cache:
        read_metadata(path)
        return None
    data = open_dataset(path, resolution, center_crop=not random_crop, random_flip=flip, seed=seed, rank=rank,
                        world_size=world)
    check_one_batch(data, path, batch_size, world)
    return data


def open_loader(data, teacher, teacher_name: str, path: str, resolution: int, batch_size: int,
                num_workers: int, seed: int = 1234, cache: Path | None = None, rank: int = 0, world: int = 1):
    """This rank's share of the data: images and captions, or with a latent `cache` the cached VAE posteriors
    and text states (the cache is built first where it is not complete; minisd/latent_cache.py)."""
    collate_fn = collate
    if cache:
        latent_cache.build(teacher, path, cache, resolution, batch_size, num_workers, rank, world,
                           teacher_name)
        data = latent_cache.CachedDataset(cache, path, seed=seed)
        collate_fn = latent_cache.collate
    return make_loader(data, batch_size, num_workers, pin_memory=teacher.device.type == "cuda",
                       collate_fn=collate_fn, rank=rank, world_size=world)


def batches(loader, state: TrainState):
    """The loader's batches, epoch after epoch, from where `state` is (a resumed run's next batch) without
    end. state.epoch and state.position follow them: the samples this rank took in the epoch, whole batches,
    as the loader draws ahead of the loop. A batch whose images all failed to load (None) is counted and
    passed over; a whole epoch without one stops the run (TrainingError) rather than spin forever."""
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.set_state(state.epoch, state.position)
    else:  # a stream of tar shards skips what this rank already took
        loader.dataset.set_state(state.epoch, state.position, loader.batch_size)
    stream, whole, usable = iter(loader), state.position == 0, 0
    while True:
        try:
            batch = next(stream)
        except StopIteration:  # one pass is one epoch; the loader starts the next by itself
            if whole and not usable:
                skipped = getattr(loader.dataset, "skipped", 0)
                raise TrainingError(f"a whole pass over the data gave no batch of {loader.batch_size} usable "
                                    f"images ({skipped} could not be read so far): check the images, or "
                                    "lower --batch-size") from None
            state.epoch, state.position, stream = state.epoch + 1, 0, iter(loader)
            whole, usable = True, 0
            continue
        state.position += loader.batch_size
        if batch is not None:
            usable += 1
            yield batch


class LossMeter:
    """The loss terms summed on the device over the steps since the last log row, so that no step waits for
    the GPU; read() gives their means, over all ranks, and the samples per second since the last read."""
    TERMS = ("loss", "sd", "out", "feat")  # kd_step's

    def __init__(self, device: torch.device, world: int, terms: tuple[str, ...] = TERMS):
        self.terms, self.world = terms, world
        self.sums = torch.zeros(len(terms), device=device)
        self.steps, self.samples, self.start = 0, 0, time.time()

    def add(self, losses: dict[str, torch.Tensor], accum: int, samples: int) -> None:
        """One micro-batch's terms, each 1/accum of its step's; `samples` over all ranks."""
        self.sums += torch.stack([losses[k].detach() for k in self.terms]) / accum
        self.samples += samples

    def read(self) -> tuple[dict[str, float], float]:
        """The means over the steps since the last read (fewer than --log-steps after a resume or at the end),
        and the samples per second; then starts anew."""
        if self.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world
        means = dict(zip(self.terms, (self.sums / self.steps).tolist()))
        now = time.time()
        rate = self.samples / (now - self.start)
        self.sums.zero_()
        self.steps, self.samples, self.start = 0, 0, now
        return means, rate


def check_finite(means: dict[str, float], step: int, saves: Checkpoints) -> None:
    """A log row's losses must be finite; else the run stops (the weights it would save are lost already)."""
    if not all(math.isfinite(v) for v in means.values()):
        bad = next(f"{k} {v}" for k, v in means.items() if not math.isfinite(v))
        raise TrainingError(f"the loss became non-finite ({bad}) by step {step}; stopped. The last good "
                            f"checkpoint is {saves.last()}. Try a lower --lr, or --max-grad-norm.")


class RunLog:
    """Rank 0's record of a run: rows appended to log.jsonl (a resumed run goes on in the same file, from its
    checkpoint's step: rows of steps it redoes are dropped), the progress bar and its figures, and `report`
    (TensorBoard or wandb) if given; on other ranks it writes nothing."""

    def __init__(self, out: Path, rank: int, total: int, initial: int, desc: str, report=None,
                 shown: tuple[str, ...] = ("sd", "out", "feat", "samples_per_s", "peak_mem_gb"),
                 plotted: tuple[str, ...] = LossMeter.TERMS):
        self.out, self.report, self.shown, self.plotted = out, report, shown, plotted
        self.file = None
        if rank == 0:
            keep_rows_to(out / "log.jsonl", initial)
            self.file = open(out / "log.jsonl", "a")
        self.bar = tqdm(total=total, initial=initial, disable=rank != 0, desc=desc)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in self.shown})
        if self.report is not None:
            self.report(row)

    def close(self, plot: bool = True) -> None:
        """Closes the bar (so that what is printed next starts a line of its own) and the file, and draws the
        whole run's losses (resumed parts too) into losses.png."""
        self.bar.close()
        if self.file is None:
            return
        self.file.close()
        if plot:
            plot_losses([json.loads(line) for line in open(self.out / "log.jsonl")], self.out / "losses.png",
                        self.plotted)


def keep_rows_to(path: Path, step: int) -> None:
    """log.jsonl without the rows after `step` (and a line a kill cut short): a run that resumes from
    checkpoint `step` logs the later steps again."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                rows.append(line + "\n")
    tmp = path.with_name(".log.jsonl.tmp")
    tmp.write_text("".join(rows))
    os.replace(tmp, path)


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


@dataclass(frozen=True)
class Every:
    """When a run stops, logs (and checks its loss), saves and draws its validation images, in steps."""
    max_steps: int
    log_steps: int
    save_steps: int
    valid_steps: int = 0  # 0: never


def loop(state: TrainState, step, every: Every, saves: Checkpoints, log: RunLog, meter: LossMeter, row=None,
         probe=None, validate=None, rank: int = 0, world: int = 1, device=torch.device("cpu")) -> bool:
    """The loop around a script's step, shared by train.py, train_vae.py, dreambooth.py and train_lcm.py.
    True when it ran to `every.max_steps`: the script then writes its result. False when stopped early (the
    way to go on is printed), and the log is closed either way.

    step(): one optimizer step (its micro-batches, backward, clipping, update), adding its loss terms to
    `meter`. Around it: the step count, a log row every `every.log_steps` (and at each save and the last
    step) whose losses must be finite, `row(r)` adding the script's own figures to it; a checkpoint every
    `every.save_steps` and at the end, from rank 0 (Checkpoints: healthy weights only, `probe` checks them);
    `validate(step)` on rank 0 every `every.valid_steps`. Ctrl-C or SIGTERM finishes the step, logs, saves
    and returns: one process sees it at once, several agree at the next log step (an all-reduce). Raises
    TrainingError for a run that cannot go on."""
    try:
        run_steps(state, step, every, saves, log, meter, row, probe, validate, rank, world, device)
    finally:
        log.close()
    if state.step < every.max_steps and rank == 0:
        print(f"stopped at step {state.step}: {checkpoints(saves.out)[-1]}; run the same command to go on")
    return state.step == every.max_steps


def run_steps(state, step, every, saves, log, meter, row, probe, validate, rank, world, device) -> None:
    with stop_signals() as stop:
        while state.step < every.max_steps:
            step()
            state.step += 1
            meter.steps += 1
            log.bar.update(1)
            if ((world == 1 and stop) or state.step % every.log_steps == 0
                    or state.step % every.save_steps == 0 or state.step == every.max_steps):
                means, rate = meter.read()
                check_finite(means, state.step, saves)
                logged = dict(step=state.step, **means, samples_per_s=rate, epoch=state.epoch)
                log.write(row(logged) if row is not None else logged)
                if any_rank(bool(stop), device, world):
                    break
            if state.step % every.save_steps == 0:
                save(saves, state, probe, rank)
            if validate and every.valid_steps and state.step % every.valid_steps == 0 and rank == 0:
                validate(state.step)
        save(saves, state, probe, rank, final=True)


def save(saves: Checkpoints, state: TrainState, probe, rank: int, final: bool = False) -> None:
    """A checkpoint from rank 0; the others wait for it."""
    if rank == 0:
        saves.save(state, probe, final)
    if dist.is_initialized():
        dist.barrier()



def probe(pipe: Pipeline, size: int):
    """For Checkpoints.save: a function giving the U-Net's prediction for one fixed noisy latent and the empty
    prompt (through the pipeline's text encoder, which may be learning too), at `size` px."""
    def run() -> torch.Tensor:
        context = pipe.text_encoder(pipe.tokenizer([""]).to(pipe.device)).float()
        x = torch.randn(1, pipe.unet.config.in_channels, size // 8, size // 8,
                        generator=torch.Generator().manual_seed(0))
        return pipe.unet(x.to(pipe.device), torch.tensor([500], device=pipe.device), context)
    return run


@torch.no_grad()
def sample_grid(pipe: Pipeline, prompts: list[str], path: Path, size: int, steps: int = 25, **call) -> None:
    """Fixed prompts and seeds (image i from seed i) through sample.py's pipeline, one PNG row at `path`: how
    a run's model draws as it learns. `call`: more of the pipeline call's settings (scheduler, guidance)."""
    pipe.unet.eval()
    images = pipe(prompts, steps=steps, seed=0, seed_mode="per_image", height=size, width=size,
                  progress=False, **call)
    pipe.unet.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=len(images)).save(path)

def plot_losses(rows: list[dict], path: Path, keys=("loss", "sd", "out", "feat")) -> None:
    """A PNG line plot of the logged loss terms against the step (log scale), drawn with PIL. A term that is 0
    throughout (out and feat of a --plain run) is left out: on a log scale it would squash the others flat."""
    if len(rows) < 2:
        return
    w, h, pad = 800, 480, 50
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    colours = {"loss": "black", "sd": "blue", "out": "orange", "feat": "green", "rec": "blue", "kl": "orange"}
    steps = [r["step"] for r in rows]
    keys = [k for k in keys if k in rows[0] and any(r.get(k, 0) > 0 for r in rows)]
    values = [math.log10(max(r[k], 1e-12)) for r in rows for k in keys]
    if not values:
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
