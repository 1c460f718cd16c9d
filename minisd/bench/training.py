"""`python -m minisd.bench train`: minisd's KD step against BK-SDM's reference step (kd_steps.py).

Both start from the same random teacher and student weights and take the same batch: random
images and captions at the chosen resolution, already in memory (data loading is not timed; in
train.py it runs ahead in DataLoader workers). Each library first runs --warmup steps (compilation,
cuDNN autotuning), then blocks of --steps steps alternate (A B B A ...). Reported per library:
samples per second, peak memory, achieved TFLOP/s from the analytic count (teacher forward, student
forward and backward, text encoding, VAE encode), its fraction of the device's peak, and on CUDA how
many times a step made the host wait for the GPU. A third row, "minisd (cached)", is minisd's step
fed from --cache-latents (VAE posterior and text states precomputed; no VAE encode, no text encoder).
--reference-only times BK-SDM's step alone (the GPU check times train.py itself against it).

--memory-probe runs minisd's step alone at each --batch and reports whether it fits and its peak
memory (CUDA only): the largest per-GPU batch without activation checkpointing, or with
--gradient-checkpointing, whether BK-SDM's per-GPU batch of 64 fits.
"""

import torch

from minisd.bench.kd_steps import MinisdKD, ReferenceKD
from minisd.bench.measure import Peak, alternate, count_syncs, device_peak, median, model_bytes
from minisd.bench.models import random_pipeline
from minisd.flops import kd_step_flops
from minisd.table import variant

CAPTIONS = ["a black vase holding a bouquet of roses", "a golden retriever on a beach at sunset",
            "an astronaut riding a horse, oil painting", "a bowl of ramen, studio photo"]


def make_batches(teacher, batch: int, size: int, seed: int = 0) -> tuple[dict, dict]:
    """(an image batch, the same batch as the cache holds it), pinned like a DataLoader's on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    images = {"pixels": torch.rand(batch, 3, size, size, generator=gen) * 2 - 1, "text": texts,
              "seed": torch.arange(batch, dtype=torch.int64), "input_ids": teacher.tokenizer(texts)}
    with torch.no_grad():
        posterior = teacher.vae.encode(images["pixels"].to(teacher.device, teacher.vae_dtype))
        context = teacher.text_encoder(teacher.tokenizer(texts).to(teacher.device))
    cached = {"mean": posterior.mean.cpu(), "std": posterior.std.cpu(), "context": context.cpu(),
              "text": texts, "seed": images["seed"]}
    if teacher.device.type == "cuda":
        images, cached = ({k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
                          for b in (images, cached))
    return images, cached


def run(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per (config, batch, library); with --memory-probe, one per (config, batch) for minisd alone."""
    rows = []
    for name in args.config:
        for b in args.batch:
            rows += run_one(args, name, b, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run_one(args, name: str, b: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    peak_tflops, _ = device_peak(device, dtype, args.peak_tflops)
    compile = device.type == "cuda" and args.compile != "off" and not args.reference_only
    teacher = random_pipeline(args.family, "sd", small=args.small, device=device)
    size = args.size or teacher.native_size
    common = dict(config=f"{args.family}-{name}" + ("-reduced" if args.small else ""), size=size, batch=b,
                  compiled=compile, checkpointing=args.gradient_checkpointing)
    flops = {cached: kd_step_flops(variant(teacher.unet.config, name), teacher.unet.config, size, cached,
                                   teacher.vae.config, teacher.text_encoder.config)["total"]
             for cached in (False, True)}
    ours = MinisdKD(teacher, name, compile=compile, checkpointing=args.gradient_checkpointing)
    # after MinisdKD cast the teacher to its training dtype: the cached batch is what train.py's cache holds
    images, cached = make_batches(teacher, b, size)
    if args.memory_probe:
        return [dict(common, lib="minisd", **probe(ours, images, device))]
    steps, owners = {}, {}
    if not args.reference_only:  # else ours only gives the reference its student's starting weights
        steps = {"minisd": lambda: ours.step(images), "minisd (cached)": lambda: ours.step(cached)}
        owners = {"minisd": ours, "minisd (cached)": ours}
    if not args.no_reference:
        ref = ReferenceKD(teacher, ours.student, name)
        steps["BK-SDM reference"], owners["BK-SDM reference"] = (lambda: ref.step(images)), ref
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    seconds, peaks = alternate({lib: lambda fn=fn: [fn() for _ in range(args.steps)]
                                for lib, fn in steps.items()},
                               args.repeats, device)
    rows = []
    for lib, fn in steps.items():
        rate = args.steps * b / median(seconds[lib])
        work = flops[lib == "minisd (cached)"]
        rows.append(dict(common, lib=lib, samples_per_s=rate,
                         peak_gb=(model_bytes(*owners[lib].modules()) + peaks[lib]) / 2**30,
                         tflops=work * rate / 1e12, fraction_of_peak=work * rate / 1e12 / peak_tflops,
                         syncs_per_step=count_syncs(fn, device)))
    return rows


def probe(ours: MinisdKD, batch: dict, device: torch.device) -> dict:
    """Two steps at this batch: does it fit, and its peak memory (CUDA)."""
    try:
        with Peak(device) as peak:
            for _ in range(2):
                ours.step(batch)
    except torch.OutOfMemoryError:
        return {"fits": False, "peak_gb": None}
    return {"fits": True, "peak_gb": (model_bytes(*ours.modules()) + peak.bytes) / 2**30}
