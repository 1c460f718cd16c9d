"""The parts of the GPU check (gpu_check.py): each measures its goals through the bench's own harnesses
(commands.measure, the code of `python -m minisd.bench sample` and `train`) or runs the real scripts
(train.py, sample.py, dreambooth.py) as subprocesses on generated data and random-weight models at the real
configs.

--dry-run changes sizes and counts only: the CPU, every model at reduced size (minisd.bench.models.reduced),
32 px, one denoising step, one timed call, one training step, and the compile backend "eager" (dynamo traces
the U-Net as one graph, as on the GPU, but generates no code: inductor on a CPU takes minutes).
"""

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.bench import commands
from minisd.bench.measure import GB, environment
from minisd.bench.models import random_pipeline
from minisd.training import checkpoints

ROOT = Path(__file__).resolve().parents[2]  # the repository: the scripts run from here
# every `sample` call of the dry run: the smoke-run sizes of tests/test_bench.py
DRY_SAMPLE = ["--small", "--size", "32", "--steps", "1", "--repeats", "1", "--unet-calls", "1",
              "--device", "cpu"]
DRY_TRAIN = ["--small", "--size", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
CAPTIONS = ["a red panda in the snow", "a lighthouse at dusk", "a bowl of ramen, studio photo", "a castle"]


class Context:
    """What the parts share: the device, sizes, whether the reference side imports, and the record of the part
    that runs (gpu_check.State)."""

    def __init__(self, args, state, log: Path):
        self.args, self.state, self.log, self.current = args, state, log, None
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry or not torch.cuda.is_available() else "cuda")
        self.peak = None if self.dry else args.peak_tflops  # the dry run's: a CPU matmul, measured
        self.threads = torch.get_num_threads()
        if self.dry:
            torch.set_num_threads(1)  # a CPU shared with other jobs: threads that wait for each other stall
        self.work = Path(tempfile.mkdtemp(prefix="minisd-gpu-check-"))
        self.env = dict(os.environ, HF_HUB_OFFLINE="1")  # the scripts': the GPU machine has no network
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        state.data["environment"] = environment(self.device, state.data["argv"])
        state.save()

    def rows(self, rows: list[dict]) -> None:
        self.state.part(self.current).setdefault("rows", []).extend(rows)
        self.state.save()

    def figures(self, **figures) -> None:
        self.state.part(self.current).setdefault("figures", {}).update(figures)
        self.state.save()

    def note(self, text: str) -> None:
        self.state.part(self.current).setdefault("notes", []).append(text)
        self.state.save()

    def sample(self, *flags: str, batch: int = 1) -> list[dict]:
        """The rows of `python -m minisd.bench sample` with these flags, the reference side if it imports."""
        argv = ["sample", *flags, "--batch", str(min(batch, 2) if self.dry else batch)]
        argv += (DRY_SAMPLE + ["--backend", "eager"]) if self.dry else ["--device", self.device.type]
        return self.harness(argv)

    def no_reference(self) -> str | None:
        """None when the reference side imports, else why not; asked once, by the first part that needs it."""
        if "no_reference" not in self.state.data:
            self.state.data["no_reference"] = reference_side()
        return self.state.data["no_reference"]

    def harness(self, argv: list[str]) -> list[dict]:
        if self.no_reference():
            argv.append("--no-reference")
        if self.peak:
            argv += ["--peak-tflops", str(self.peak)]
        rows, peak = commands.measure(commands.parse_args(argv))
        self.state.data["peak"] = peak
        return rows

    def script(self, argv: list[str]) -> dict:
        """python argv[0] ... from the repository root, in a process group of its own (a cap stops all of it,
        DataLoader workers too); its output in the work folder and its last lines in the check's log."""
        out = self.work / f"{Path(argv[0]).stem}.out"
        start = time.time()
        with open(out, "w") as f:
            process = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=self.env, stdout=f,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait()
            except BaseException:  # the part's cap (CapReached), or an interrupt
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            finally:
                with open(self.log, "a") as log:
                    log.write(f"\n--- {self.current}: {' '.join(map(str, argv))}\n{tail(out, 60)}\n")
        return dict(code=code, seconds=round(time.time() - start, 1), tail=tail(out, 8))

    def clean_up(self) -> bool:
        """Frees what the part left (its files, compiled graphs, CUDA graph pools, cached blocks); False when
        the CUDA context is unusable (an illegal access poisons it for the process)."""
        for folder in self.work.iterdir():  # the models saved for the scripts: gigabytes each
            shutil.rmtree(folder, ignore_errors=True)
        gc.collect()
        torch._dynamo.reset()
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.ones(1, device=self.device).add_(1).item()
        except RuntimeError:
            return False
        return True

    def finish(self) -> None:
        self.state.data["environment"] = environment(self.device, self.state.data["argv"])  # diffusers' too
        self.state.save()
        shutil.rmtree(self.work, ignore_errors=True)
        torch.set_num_threads(self.threads)


def reference_side() -> str | None:
    """None when diffusers and transformers import, else why not (the minisd sides then run alone)."""
    try:
        import minisd.bench.reference  # noqa: F401
    except Exception as e:  # ImportError, or a version check of theirs that fails
        return f"{type(e).__name__}: {e}"
    return None


def tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def sample_eager(ctx: Context) -> None:
    for config in ("sd", "small", "tiny"):  # one config at a time, so that a stopped part keeps the earlier
        ctx.rows(ctx.sample("--config", config, "--repeats", "3", "--unet-calls", "20"))


def tiny_memory(ctx: Context) -> None:
    """minisd alone, so that nothing else is on the device: the harness's row (the models' bytes and the
    activations' peak), and the allocator's own peak over the whole part."""
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ctx.rows(ctx.sample("--config", "tiny", "--no-reference", "--repeats", "1", "--unet-calls", "1"))
    if cuda:
        ctx.figures(peak_allocated_gb=(torch.cuda.max_memory_allocated() - base) / GB,
                    peak_reserved_gb=torch.cuda.max_memory_reserved() / GB)


def sample_b16(ctx: Context) -> None:
    ctx.rows(ctx.sample("--config", "small", "--repeats", "2", "--unet-calls", "5", batch=16))


def lcm(ctx: Context) -> None:
    ctx.rows(ctx.sample("--config", "tiny", "--scheduler", "lcm", "--vae", "tiny", "--repeats", "3",
                        "--unet-calls", "20"))


def kd(ctx: Context) -> None:
    """BK-SDM-Small distilled from SD-v1.4 at 512 px, batch 32, two ways. BK-SDM's reference step through
    the harness (`bench train --reference-only`: eager, as BK-SDM runs it); then train.py itself, which is
    minisd's side of the goals: its CUDA defaults (torch.compile, bf16 teacher and autocast, fused AdamW) on
    generated pairs from a random SD-v1.4 saved as a diffusers folder, its samples/s and peak memory from its
    log. One compile, not two (the harness's minisd step would compile the same graphs again). sample.py then
    draws from the checkpoint train.py wrote."""
    size, batch, steps, log_steps, workers = (32, 2, 1, 1, 1) if ctx.dry else (512, 32, 30, 5, 4)
    if not ctx.no_reference():
        argv = ["train", "--config", "small", "--reference-only", "--steps", "3", "--warmup", "2",
                "--repeats", "2"]
        ctx.rows(ctx.harness(argv + (DRY_TRAIN if ctx.dry else ["--device", ctx.device.type]) +
                             ["--batch", str(batch)]))
    work = ctx.work / "train"
    teacher = save_model(ctx, "sd", work / "teacher")
    data = write_pairs(work / "data", 2 * batch, size)
    run = work / "run"
    trained = ctx.script(["train.py", "--variant", "small", "--teacher", teacher, "--data", data,
                          "--out", run, "--resolution", size, "--batch-size", batch, "--global-batch", batch,
                          "--max-steps", steps, "--log-steps", log_steps, "--save-steps", steps,
                          "--valid-steps", 0, "--num-workers", workers, "--seed", 0])
    ctx.figures(train_exit=trained["code"], train_s=trained["seconds"], **logged(run, batch))
    if trained["code"]:
        raise RuntimeError(f"train.py exited with {trained['code']}: {trained['tail']}")
    checkpoint = checkpoints(run)[-1]
    image = work / "sample.png"
    flags = ["--device", "cpu", "--height", size, "--width", size] if ctx.dry else []
    sampled = ctx.script(["sample.py", "a red panda", "--model", checkpoint, "--steps", 2, "--out", image,
                          *flags])
    ctx.figures(checkpoint=checkpoint.name, sample_exit=sampled["code"], sample_s=sampled["seconds"])
    if sampled["code"]:
        raise RuntimeError(f"sample.py exited with {sampled['code']}: {sampled['tail']}")
    ctx.figures(image="x".join(map(str, Image.open(image).size)))


def sample_compiled(ctx: Context) -> None:
    mode = [] if ctx.dry else ["--mode", "reduce-overhead"]  # CUDA graphs; none with the eager backend
    ctx.rows(ctx.sample("--config", "small", "--compile", "on", *mode, "--repeats", "3",
                        "--unet-calls", "20"))


def dreambooth(ctx: Context) -> None:
    """dreambooth.py --lora with its defaults (prior preservation, the text encoder's LoRA too, gradient
    checkpointing) but eager, on 4 generated photos and 2 class images it draws itself: compiled, its first
    step had not finished after 120 s on an H200 (2026-12-04), more than the check's budget can give it."""
    size, steps, log_steps, classes, class_steps = (32, 1, 1, 1, 1) if ctx.dry else (512, 20, 10, 2, 2)
    work = ctx.work / "dreambooth"
    model = save_model(ctx, "small", work / "model")
    photos = write_pairs(work / "photos", 4, size, captions=False)
    run = work / "run"
    flags = ["--device", "cpu"] if ctx.dry else ["--no-compile"]
    result = ctx.script(["dreambooth.py", "--model", model, "--instance-data", photos,
                         "--instance-prompt", "a sks dog", "--class-prompt", "a dog",
                         "--num-class-images", classes, "--class-steps", class_steps, "--lora",
                         "--max-steps", steps, "--log-steps", log_steps, "--save-steps", steps,
                         "--resolution", size, "--num-workers", 2, "--out", run, *flags])
    # a step trains on one instance and one class image (batch 1 with prior preservation)
    figures = logged(run, 2)
    ctx.figures(dreambooth_exit=result["code"], dreambooth_s=result["seconds"], **figures)
    if result["code"]:
        raise RuntimeError(f"dreambooth.py exited with {result['code']}: {result['tail']}")
    lora = run / "pytorch_lora_weights.safetensors"
    ctx.figures(lora_mb=lora.stat().st_size / 2**20)


def save_model(ctx: Context, name: str, folder: Path) -> Path:
    """A random-weight pipeline of config `name` as a diffusers folder (fp32, as a download is), built on the
    device (random init is slow on a CPU) and freed before the script that loads it runs."""
    pipe = random_pipeline("v1", name, small=ctx.dry, device=ctx.device)
    pipe.save(folder)
    del pipe
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_pairs(folder: Path, n: int, size: int, captions: bool = True) -> Path:
    """n smooth random RGB images (upscaled noise, so that resizing and PNG do real work), with metadata.csv
    captions for train.py."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    if captions:
        rows = [f"{i:04d}.png,{CAPTIONS[i % len(CAPTIONS)]}" for i in range(n)]
        (folder / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n")
    return folder


def logged(run: Path, samples_per_step: int) -> dict:
    """A script's log.jsonl, summed up: steps, steps/s (the rows after the first, whose time holds the
    compiles; the only row if there is one) and the peak memory it logged."""
    path = run / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        return {}
    timed = rows[1:] or rows
    rate = sum(r["samples_per_s"] for r in timed) / len(timed)
    figures = dict(steps=rows[-1]["step"], steps_per_s=rate / samples_per_step, samples_per_s=rate)
    if any("peak_mem_gb" in r for r in rows):
        figures["peak_gb"] = max(r.get("peak_mem_gb", 0) for r in rows)
    return figures
