"""`python -m minisd.bench sample`: minisd's Pipeline against diffusers' StableDiffusionPipeline.

Both hold the same random weights at the chosen config, in the same dtype, and run the same work:
the same prompts, resolution, steps, guidance 7.5, VAE decode and conversion to a numpy image. For each
batch size the two libraries run alternately in one process (A B B A ...), after a warm-up run each that
is not timed. Reported per library: U-Net calls per second at the batch the U-Net runs ("it/s" as the
diffusers progress bar counts it), seconds per image and images per second end to end, peak memory,
achieved TFLOP/s (the analytic count of minisd.flops for the work done) and its fraction of the
device's peak.

Each --config runs once per --scheduler and --vae, so one run sets the settings side by side:
  pndm  PLMS, 25 steps by default (steps + 1 U-Net calls), one batched CFG pass (U-Net batch 2 x batch);
  lcm   an LCM U-Net with guidance distilled in (guidance embedding, minisd/table.py), 4 steps by default,
        no CFG pass (U-Net batch = batch); diffusers runs StableDiffusionPipeline with LCMScheduler, which
        decides as its LatentConsistencyModelPipeline does for such a U-Net;
  --vae sd: SD's KL decoder; tiny: TAESD (minisd/vae_tiny.py; diffusers' AutoencoderTiny).

minisd runs with its speed paths: fused self-attention q/k/v and channels_last (and, with
--compile, its compiled U-Net). diffusers runs as a user gets it (SDPA attention, its default);
with --compile it gets its documented recipe: channels_last, fuse_qkv_projections(), and
torch.compile of the U-Net with the same mode, backend and fullgraph=True. --no-reference: minisd alone.
"""

import torch

from minisd.bench.measure import alternate, device_peak, median, model_bytes
from minisd.bench.models import random_pipeline
from minisd.blocks import guidance_embedding
from minisd.flops import sampling_flops

PROMPT = "a black vase holding a bouquet of roses"
GUIDANCE = 7.5  # CFG's scale; for an LCM U-Net the scale its guidance embedding imitates (w = 6.5)
DEFAULT_STEPS = {"pndm": 25, "lcm": 4}


def compile_diffusers(ref, mode: str | None, backend: str = "inductor") -> None:
    """diffusers' speed recipe (its docs, "Accelerate inference"): channels_last, fused q/k/v, compiled
    U-Net."""
    ref.unet.to(memory_format=torch.channels_last)
    ref.fuse_qkv_projections()
    ref.unet = torch.compile(ref.unet, mode=mode, fullgraph=True, dynamic=False, backend=backend)


def run(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per (config, scheduler, vae, compile, batch, library)."""
    rows = []
    for name in args.config:
        for scheduler in args.scheduler:
            for vae in args.vae:
                rows += run_config(args, name, scheduler, vae, device, dtype)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def run_config(args, name: str, scheduler: str, vae: str, device: torch.device,
               dtype: torch.dtype) -> list[dict]:
    peak_tflops, _ = device_peak(device, dtype, args.peak_tflops)
    lcm = scheduler == "lcm"
    pipe = random_pipeline(args.family, name, small=args.small, device=device, dtype=dtype, lcm=lcm,
                           tiny_vae=vae == "tiny")
    ref = None
    if not args.no_reference:
        from minisd.bench.reference import diffusers_pipeline  # diffusers: imported when the reference runs

        ref = diffusers_pipeline(pipe, scheduler)
    pipe.fuse_qkv().channels_last()
    size = args.size or pipe.native_size
    steps = args.steps or DEFAULT_STEPS[scheduler]
    calls = steps if lcm else steps + 1  # PNDM (PLMS) spends one extra U-Net call on its warm-up
    flops = sampling_flops(pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, size=size,
                           steps=calls, guidance=not lcm)["total"]
    resident = {"minisd": model_bytes(pipe.unet, pipe.vae, pipe.text_encoder)}
    generate = {"minisd": lambda b: pipe([PROMPT] * b, steps=steps, guidance=GUIDANCE, height=size,
                                         width=size, scheduler=scheduler, progress=False, output="np")}
    if ref is not None:
        resident["diffusers"] = model_bytes(ref.unet, ref.vae, ref.text_encoder)
        generate["diffusers"] = lambda b: ref([PROMPT] * b, num_inference_steps=steps,
                                              guidance_scale=GUIDANCE, height=size, width=size,
                                              output_type="np",
                                              generator=torch.Generator().manual_seed(0)).images
    rows = []
    for compiled in ([False, True] if args.compile == "both" else [args.compile == "on"]):
        if compiled:
            pipe.compile(args.mode, args.backend)
            if ref is not None:
                compile_diffusers(ref, args.mode, args.backend)
        for b in args.batch:
            label = (f"{args.family}-{name}" + ("-reduced" if args.small else "")
                     + (f" lcm-{steps}" if lcm else "") + (" taesd" if vae == "tiny" else ""))
            common = dict(config=label, size=size, scheduler=scheduler, steps=steps, unet_calls=calls,
                          vae=vae, batch=b, dtype=str(dtype).removeprefix("torch."), compiled=compiled)
            its = unet_rates(pipe, ref, b, size, args.repeats, args.unet_calls, device, dtype,
                             3 if compiled else 1, cfg=not lcm)
            for lib in generate:  # warm-up: compilation, CUDA graph capture, first-call setup
                generate[lib](b)
            seconds, peaks = alternate({lib: lambda fn=fn: fn(b) for lib, fn in generate.items()},
                                       args.repeats, device)
            for lib in generate:
                s = median(seconds[lib])
                rows.append(dict(common, lib=lib, unet_its=its[lib], s_per_image=s / b, images_per_s=b / s,
                                 peak_gb=(resident[lib] + peaks[lib]) / 2**30, tflops=flops * b / s / 1e12,
                                 fraction_of_peak=flops * b / s / 1e12 / peak_tflops))
    return rows


@torch.no_grad()
def unet_rates(pipe, ref, batch: int, size: int, repeats: int, calls: int, device, dtype,
               warmup: int = 3, cfg: bool = True) -> dict[str, float]:
    """U-Net calls per second at the batch the pipeline runs it (2 x batch with CFG), each library's U-Net on
    the same inputs (an LCM U-Net's guidance weight included), after `warmup` untimed calls (a compiled U-Net
    compiles on the 1st, captures CUDA graphs on the 2nd and 3rd). ref None: minisd's alone."""
    latent = size // pipe.vae_scale
    n = 2 * batch if cfg else batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, pipe.unet.config.in_channels, latent, latent, generator=gen).to(device, dtype)
    context = torch.randn(n, 77, pipe.unet.config.context_dim, generator=gen).to(device, dtype)
    t = torch.tensor(500, device=device)
    dim = pipe.unet.config.guidance_embed_dim
    w = torch.full((n,), GUIDANCE - 1, device=device) if dim else None
    cond = guidance_embedding(w, dim).to(dtype) if dim else None
    step = {"minisd": lambda: pipe.predict(x, t, context, w)}
    if ref is not None:
        step["diffusers"] = lambda: ref.unet(x, t, encoder_hidden_states=context, timestep_cond=cond,
                                             return_dict=False)[0]
    for fn in step.values():
        for _ in range(warmup):
            fn()
    seconds, _ = alternate({lib: lambda fn=fn: [fn() for _ in range(calls)] for lib, fn in step.items()},
                           repeats, device)
    return {lib: calls / median(s) for lib, s in seconds.items()}
