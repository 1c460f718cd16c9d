"""Few-step BK-SDM: latent consistency distillation (Luo et al., arXiv 2310.04378) of any model minisd loads,
so that an image takes 4 U-Net calls instead of 25 steps with guidance (50 calls).

    python train_lcm.py --teacher weights/bk-tiny/checkpoint-0050000 --data data/laion_aes/preprocessed_212k
        --out weights/bk-tiny-lcm
    python train_lcm.py --teacher nota-ai/bk-sdm-small --lora --data ... --out weights/bk-small-lcm-lora
    python sample.py "a black vase holding a bouquet of roses" --model weights/bk-tiny-lcm --scheduler lcm
        --steps 4
    python sample.py "..." --model nota-ai/bk-sdm-small --lora weights/bk-small-lcm-lora --scheduler lcm
        --steps 4 --guidance 1
    python train_lcm.py --teacher CompVis/stable-diffusion-v1-4 --student nota-ai/bk-sdm-tiny --data ...
        --out weights/bk-tiny-lcm-from-sd

Two forms (minisd/lcd_step.py has the step):
- full LCD: the student is the teacher's U-Net with a guidance embedding added (diffusers'
  time_cond_proj_dim): it learns to jump to the trajectory's origin under guidance 1 + w for any w in
  [--w-min, --w-max], taken as an input, so sampling needs no CFG pass. Its target network is an EMA of it
  (--ema-decay 0.95). `--out` ends as a pipeline whose U-Net is that EMA and whose scheduler is LCM's.
- --lora (LCM-LoRA, arXiv 2311.05556): LoRA layers on the teacher's own U-Net learn the same jump, guidance
  distilled in at a w drawn per sample, and the student is its own target. `--out` ends with
  pytorch_lora_weights.safetensors (diffusers' layout), which sample.py --lora and diffusers'
  load_lora_weights read, and which adds to other LoRAs.
--student starts the learning network from another model's U-Net instead of the teacher's: a smaller
student that shares the teacher's VAE and text encoder (BK-SDM-Tiny beside SD-v1.4), which then learns the
jump on the larger teacher's trajectories (the ODE solver's guided DDIM steps) rather than on its own. The
result is the student's: the pipeline holds its U-Net, and the LoRA goes on it.
Data, checkpoints, resume, stops and DDP are train.py's (minisd/training.py); the defaults are diffusers' LCM
distillation examples': constant lr 1e-6 (1e-4 for LoRA, rank 64, alpha 64), pseudo-Huber loss (c 0.001), no
weight decay, the DDIM solver over a 50-step skipping schedule (k = 20).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minisd.checkpoints.diffusers import model_index, save_unet, write_json
from minisd.checkpoints.lora_files import WEIGHT_NAME as LORA_WEIGHTS
from minisd.checkpoints.lora_files import write_lora
from minisd.cli import (
    UsageError,
    bad_input_exits,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from minisd.lcd_step import LCDRecipe, lcd_step
from minisd.lora import inject_lora, lora_layers, lora_parameters
from minisd.pipeline import Pipeline, default_dtype, load_pipeline
from minisd.schedulers import NoiseSchedule
from minisd.training import (
    EMA,
    SHARED,
    Checkpoints,
    Every,
    LossMeter,
    RunLog,
    TrainingError,
    TrainState,
    batches,
    checkpoints,
    loop,
    open_data,
    open_loader,
    open_run,
    probe,
    read_training_state,
    sample_grid,
    setup_distributed,
    write_shared,
)
from minisd.unet import UNet, with_guidance_embedding

PROG = "train_lcm.py"
RUN_OUTPUTS = ("checkpoint-*", ".tmp-checkpoint-*", *SHARED, "unet", "model_index.json", "log.jsonl",
               "losses.png", "samples", "run.json", f"{LORA_WEIGHTS}.safetensors")
# LCM-LoRA's layers in minisd's names: diffusers' list (its LCM-LoRA scripts'), ResBlock and resampler convs too
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "ff.proj", "ff.out", "conv1", "conv2",
                "conv_shortcut", "downsample.conv", "upsample.conv", "time_emb_proj"]
VALID_PROMPTS = ["a black vase holding a bouquet of roses", "a golden retriever on a beach at sunset",
                 "an astronaut riding a horse, oil painting", "a bowl of ramen, studio photo"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the model to distill: any source sample.py takes")
    p.add_argument("--data", required=True, help="image folder with metadata.csv/jsonl, or tar shards")
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    p.add_argument("--student", help="start from this model's U-Net, not the teacher's: a smaller model with "
                                     "the teacher's VAE and text encoder (default: the teacher itself)")
    p.add_argument("--lora", action="store_true", help="LCM-LoRA instead of full LCD")
    p.add_argument("--rank", type=positive_int, default=64)
    p.add_argument("--alpha", type=positive_float, default=64.0)
    p.add_argument("--lora-targets", nargs="+", default=LORA_TARGETS)
    p.add_argument("--guidance-embed-dim", type=positive_int, default=256,
                   help="full LCD: the width of the w embedding (diffusers' time_cond_proj_dim)")
    p.add_argument("--w-min", type=nonnegative_float, default=3.0,
                   help="the guidance weight w's range; the teacher guides at 1 + w")
    p.add_argument("--w-max", type=nonnegative_float, default=15.0)
    p.add_argument("--huber-c", type=nonnegative_float, default=0.001, help="pseudo-Huber's c; 0: L2")
    p.add_argument("--solver-steps", type=positive_int, default=50,
                   help="the DDIM skipping schedule's steps (k = 1000 / 50 = 20)")
    p.add_argument("--ema-decay", type=finite_float, default=0.95, help="full LCD: the target network's")
    p.add_argument("--resolution", type=positive_int, default=512, help="a multiple of 8")
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--cache-latents", type=Path, metavar="DIR", help="as train.py's")
    p.add_argument("--batch-size", type=positive_int, default=12, help="per GPU (per process)")
    p.add_argument("--global-batch", type=positive_int, help="default: --batch-size x processes")
    p.add_argument("--max-steps", type=positive_int, default=1000)
    p.add_argument("--lr", type=positive_float, help="constant (default 1e-6, or 1e-4 with --lora)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile (it is on by default on CUDA)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-workers", type=nonnegative_int, default=4)
    p.add_argument("--log-steps", type=positive_int, default=10)
    p.add_argument("--save-steps", type=positive_int, default=500)
    p.add_argument("--keep", type=positive_int, default=2)
    p.add_argument("--valid-steps", type=nonnegative_int, default=500,
                   help="4-step LCM samples of fixed prompts every N steps (0: never)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh when it holds another run")
    args = p.parse_args(argv)
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: the VAE halves the size 3 times; give a multiple of 8")
    if args.w_min > args.w_max:
        p.error(f"--w-min {args.w_min} is above --w-max {args.w_max}")
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay {args.ema_decay}: give a number in (0, 1)")
    if args.cache_latents:
        args.no_flip = True  # a cached image has the latents of one fixed transform, unflipped
    args.lr = args.lr or (1e-4 if args.lora else 1e-6)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    with bad_input_exits(PROG):
        global_batch = args.global_batch or args.batch_size * world
        accum, rest = divmod(global_batch, args.batch_size * world)
        if rest or not accum:
            raise UsageError(f"--global-batch {global_batch} is not a multiple of --batch-size x processes "
                             f"({args.batch_size} x {world})")
        config = dict(teacher=args.teacher, data=str(args.data), resolution=args.resolution, lora=args.lora,
                      student=args.student)
        open_run(args.out, config, args.overwrite, RUN_OUTPUTS, write=rank == 0)
        data = open_data(args.data, args.resolution, args.batch_size, args.random_crop, not args.no_flip,
                         args.seed, args.cache_latents, rank, world)
        teacher = load_pipeline(args.teacher, device=device)
        student = new_student(args, starting_unet(args, teacher, device))
        if rank == 0 and not args.lora:  # the checkpoints are pipelines sampled with LCM
            write_shared(lcm_scheduled(teacher, args.solver_steps), args.out)
        teacher.to(dtype=default_dtype(device, training=True))
        trained = lora_parameters(student) if args.lora else list(student.parameters())
        optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, fused=cuda)
        # full LCD's target network is the EMA: a model whose weights are the EMA's own tensors, which
        # every update moves in place
        ema = None if args.lora else EMA(student, args.ema_decay)
        state = TrainState({"unet_lora" if args.lora else "unet": student}, optimizer, ema)
        if found := checkpoints(args.out):  # a re-run goes on from the last checkpoint
            state.restore(found[-1], read_training_state(found[-1]))
        target = student if args.lora else ema.as_model(student)
        loader = open_loader(data, teacher, args.teacher, args.data, args.resolution, args.batch_size,
                             args.num_workers, args.seed, args.cache_latents, rank, world)

    if args.gradient_checkpointing:
        student.gradient_checkpointing = True
    model = student if world == 1 else \
        torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None)
    teacher_unet = teacher.unet
    if cuda and not args.no_compile:
        model, teacher_unet = torch.compile(model), torch.compile(teacher_unet)
    schedule = NoiseSchedule.from_config(teacher.scheduler_config)
    recipe = LCDRecipe(args.solver_steps, args.w_min, args.w_max, args.huber_c or None)
    with torch.no_grad():
        uncond = teacher.text_encoder(teacher.tokenizer([""]).to(device)).float()
    run = dict(teacher=args.teacher, args=json.dumps(vars(args), default=str))
    saves = Checkpoints(args.out, args.keep, run, PROG, None if args.lora else "LCMScheduler")
    shown = Pipeline(teacher.tokenizer, teacher.text_encoder, student, teacher.vae,
                     lcm_scheduled(teacher, args.solver_steps).scheduler_config)
    stream = batches(loader, state)

    def step() -> None:
        for micro in range(accum):
            batch = next(stream)
            losses = lcd_step(batch, teacher, teacher_unet, model, target, schedule, uncond, recipe,
                              guidance_input=not args.lora)
            (losses["loss"] / accum).backward()
            meter.add(losses, accum, len(batch["seed"]) * world)
        torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(student)

    def row(logged: dict) -> dict:
        logged.update(lr=args.lr, skipped=loader.dataset.skipped)
        if cuda:
            logged["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return logged

    def validate(at: int) -> None:  # 4 LCM steps; an LCM-LoRA without guidance, full LCD at w = 7
        path = args.out / "samples" / f"step-{at:07d}.png"
        sample_grid(shown, VALID_PROMPTS, path, args.resolution, steps=4, scheduler="lcm",
                    guidance=1.0 if args.lora else 8.0)

    log = RunLog(args.out, rank, args.max_steps, state.step, f"LCM-distilling {student.config.name}",
                 shown=("loss", "samples_per_s", "peak_mem_gb"), plotted=("loss",))
    meter = LossMeter(device, world, terms=("loss",))
    try:
        every = Every(args.max_steps, args.log_steps, args.save_steps, args.valid_steps)
        check = probe(shown, args.resolution)
        finished = loop(state, step, every, saves, log, meter, row, check, validate, rank, world, device)
    except TrainingError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if finished and rank == 0:
        write_result(args, student, target)
        print(f"LCM after {state.step} steps: {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def starting_unet(args, teacher: Pipeline, device: torch.device) -> UNet:
    """The U-Net the learning network starts from: the teacher's, or --student's. A student is trained on
    the teacher's latents and text states and ends beside the teacher's VAE and text encoder, so it must
    have those very ones: a student distilled from this teacher (train.py keeps them frozen)."""
    if args.student is None:
        return teacher.unet
    other = load_pipeline(args.student, device=device)
    for part in ("vae", "text_encoder"):
        mine, theirs = getattr(other, part).state_dict(), getattr(teacher, part).state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
            raise UsageError(f"--student {args.student} has another {part} than --teacher {args.teacher}: "
                             "give a student of this teacher, which shares its VAE and text encoder")
    if other.unet.config.context_dim != teacher.unet.config.context_dim:
        raise UsageError(f"--student {args.student}'s U-Net reads text states of width "
                         f"{other.unet.config.context_dim}, the teacher's are "
                         f"{teacher.unet.config.context_dim}: give a student of this teacher")
    return other.unet


def new_student(args, base: UNet) -> UNet:
    """Full LCD: the base U-Net (the teacher's or --student's) with a guidance embedding added (its
    projection starts as nn.Linear does, as diffusers' LCD script starts it), in fp32. --lora: a copy of the
    base, frozen, with fp32 LoRA layers on --lora-targets; the teacher stays as it is, for the teacher's
    predictions."""
    device = next(base.parameters()).device
    if args.lora:
        student = UNet(base.config).to(device)
        student.load_state_dict(base.state_dict())
        student.float().requires_grad_(False).train()
        inject_lora(student, args.lora_targets, args.rank, args.alpha, dtype=torch.float32)
        return student
    if base.config.guidance_embed_dim:
        raise UsageError(f"--{'student' if args.student else 'teacher'} {args.student or args.teacher} has a "
                         "guidance embedding already: it is an LCM")
    return with_guidance_embedding(base, args.guidance_embed_dim).float().train()


def lcm_scheduled(pipe: Pipeline, solver_steps: int) -> Pipeline:
    """The same pipeline, its scheduler config LCMScheduler's over the same noise schedule and the
    distillation's skipping schedule: what a distilled model samples with by default."""
    config = {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")}
    config.update(_class_name="LCMScheduler", original_inference_steps=solver_steps)
    return Pipeline(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, config)


def write_result(args, student: UNet, target: UNet) -> None:
    """Full LCD: `--out` becomes the pipeline, its U-Net the EMA target beside the shared parts. --lora: the
    LoRA in diffusers' layout."""
    if args.lora:
        path = args.out / f"{LORA_WEIGHTS}.safetensors"
        write_lora(path, {"unet": lora_layers(student)}, {"unet": student}, "diffusers")
        return
    save_unet(target, args.out / "unet")
    write_json(args.out / "model_index.json", model_index("LCMScheduler"))


if __name__ == "__main__":
    sys.exit(main())
