"""Distill a BK-SDM student from a Stable Diffusion teacher (Kim et al., arXiv 2305.15798).

    python train.py --variant tiny --data data/laion_aes/preprocessed_212k
    python train.py --variant small --teacher stabilityai/stable-diffusion-2-1-base --data data/laion.tar
        --global-batch 128
    torchrun --nproc_per_node=8 train.py --variant base --data "data/shards/{00000..00999}.tar"
    python train.py --variant tiny --data ... --out weights/my-run
        # re-run: resumes from its last checkpoint
    python train.py --variant tiny --data ... --resume weights/my-run/checkpoint-0005000 --out weights/branch
    python train.py --plain --unet-config unet.json --teacher weights/toy-sd --data data/toy/train
        # from scratch
    python train.py --plain --variant sd --teacher data/toy-init --train-text-encoder --caption-dropout 0.1
        --data ...
    python train.py --variant small --data data/laion_aes/preprocessed_212k
        --cache-latents data/cache/laion-512

The student starts from the teacher's weights (minisd/distill.py) and learns from three losses:
the denoising task, the teacher's output, and the teacher's features. The teacher, its VAE and
text encoder are frozen. Checkpoints are whole pipeline folders that sample.py and diffusers load.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minisd.checkpoints.diffusers import unet_table_from_config
from minisd.checkpoints.files import read_json
from minisd.cli import UsageError, bad_input_exits, finite_float, nonnegative_float, nonnegative_int, \
    positive_float, positive_int
from minisd.distill import feature_pairs, student_from_teacher
from minisd.kd_step import KDRecipe, kd_step
from minisd.pipeline import Pipeline, default_dtype, load_pipeline
from minisd.schedulers import NoiseSchedule
from minisd.table import VARIANTS, variant
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
    lr_at,
    open_data,
    open_loader,
    open_run,
    probe,
    read_training_state,
    sample_grid,
    setup_distributed,
    source,
    write_shared,
)
from minisd.unet import UNet

DATA_HELP = """--data is required: the image-caption pairs to distill on, in one of two layouts:
  1. a folder of images with metadata.csv (columns file_name,text) or metadata.jsonl, as BK-SDM's
     LAION-Aesthetics subsets come (212,776 pairs for 6.5+, 2,256,472 for 6.25+; see the BK-SDM
     repository's data download script);
  2. tar shards in webdataset layout (00000.jpg + 00000.txt pairs), as img2dataset writes them:
     a folder of .tar files or a pattern like "data/{00000..00099}.tar"."""
VALID_PROMPTS = ["a black vase holding a bouquet of roses", "a golden retriever on a beach at sunset",
                 "an astronaut riding a horse, oil painting", "a bowl of ramen, studio photo"]

PROG = "train.py"  # argparse would name __main__.py under torchrun or python -m


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="tiny",
                   help="student: BK-SDM base/small/tiny, or sd")
    p.add_argument("--teacher", default="CompVis/stable-diffusion-v1-4",
                   help="any source load_pipeline accepts")
    p.add_argument("--data", help="image folder with metadata.csv/jsonl, or tar shards")
    p.add_argument("--out", type=Path, help="output folder (default weights/bk-<variant>-<teacher>)")
    p.add_argument("--resume", type=Path,
                   help="checkpoint folder to go on from (default: the last one in --out, if any)")
    p.add_argument("--resolution", type=positive_int, default=512, help="a multiple of 8")
    p.add_argument("--random-crop", action="store_true", help="random instead of center crop")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--cache-latents", type=Path, metavar="DIR",
                   help="compute the VAE posteriors and text states of an image folder once, into DIR "
                        "(resumable), and train from them; the images are then center-cropped and never "
                        "flipped")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per GPU (per process)")
    p.add_argument("--global-batch", type=positive_int, default=256,
                   help="kept whatever the GPU count: batch x GPUs x accumulation")
    p.add_argument("--max-steps", type=positive_int, default=50_000)
    p.add_argument("--lr", type=positive_float, default=5e-5)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-2)
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--lambda-sd", type=nonnegative_float, default=1.0, help="weight of the denoising loss")
    p.add_argument("--lambda-out", type=nonnegative_float, default=1.0, help="weight of output-level KD")
    p.add_argument("--lambda-feat", type=nonnegative_float, default=1.0, help="weight of feature-level KD")
    p.add_argument("--snr-gamma", type=positive_float, default=None,
                   help="Min-SNR-gamma weighting of the denoising loss (e.g. 5.0), as diffusers' "
                        "--snr_gamma; BK-SDM uses none (default)")
    p.add_argument("--plain", action="store_true",
                   help="no distillation: train the U-Net on the denoising loss alone (the teacher gives "
                        "only its VAE, text encoder and schedule)")
    p.add_argument("--unet-config", type=Path,
                   help="with --plain: a diffusers U-Net config.json for a U-Net trained from scratch "
                        "(random init)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="with --plain: train the teacher's text encoder jointly with the U-Net, as LDM "
                        "trains its text-to-image models from scratch; checkpoints then hold it in "
                        "text_encoder/")
    p.add_argument("--caption-dropout", type=finite_float, default=0.0,
                   help="share of captions replaced by the empty prompt, so that classifier-free guidance "
                        "has an unconditional model to extrapolate from (SD: 0.1); 0 for distillation, whose "
                        "teacher has one")
    p.add_argument("--ema-decay", type=finite_float, default=None,
                   help="keep an EMA of the student (e.g. 0.9999)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile (it is on by default on CUDA)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-workers", type=nonnegative_int, default=4)
    p.add_argument("--log-steps", type=positive_int, default=10,
                   help="log (and check for NaN, and for a stop signal) every N steps, and at each save")
    p.add_argument("--save-steps", type=positive_int, default=2500)
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh when it holds another run (its checkpoints, log and shared parts "
                        "are removed); without it such an --out is refused")
    p.add_argument("--valid-steps", type=nonnegative_int, default=2500,
                   help="sample grid of fixed prompts every N steps (0: never)")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none")
    args = p.parse_args(argv)
    if not args.data:
        p.error(DATA_HELP)
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: the VAE halves the size 3 times; give a multiple of 8")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay {args.ema_decay}: give a number in (0, 1), e.g. 0.9999")
    if args.unet_config and not args.plain:
        p.error("--unet-config trains a new U-Net from random weights: it needs --plain (there is no teacher "
                "block to distill it from)")
    if args.train_text_encoder and not args.plain:
        p.error("--train-text-encoder trains the text encoder from the denoising loss: it needs --plain (in "
                "distillation the teacher's text encoder stays frozen)")
    if args.cache_latents and args.train_text_encoder:
        p.error("--cache-latents stores the frozen text encoder's outputs, so the text encoder cannot train: "
                "drop --cache-latents or --train-text-encoder")
    if args.cache_latents and args.random_crop:
        p.error("--cache-latents fixes each image's crop when caching (center crop): drop --random-crop")
    if args.cache_latents:
        args.no_flip = True  # a cached image has the latents of one fixed transform, unflipped
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout {args.caption_dropout} is a probability: give a number in [0, 1)")
    args.out = args.out or Path("weights") / f"bk-{args.variant}-{args.teacher.rstrip('/').split('/')[-1]}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)

    # Everything a user can get wrong is checked, and every model loaded, before the first step: a bad input
    # costs one line (exit code 2), not a traceback after hours of training
    with bad_input_exits("train.py"):
        accum, rest = divmod(args.global_batch, args.batch_size * world)
        if rest or not accum:
            raise UsageError(f"--global-batch {args.global_batch} is not a multiple of --batch-size x "
                             f"processes ({args.batch_size} x {world})")
        open_run(args.out, run_config(args), args.overwrite, RUN_OUTPUTS, write=rank == 0)
        data = open_data(args.data, args.resolution, args.batch_size, args.random_crop, not args.no_flip,
                         args.seed, args.cache_latents, rank, world)
        # Models: the teacher (frozen; bf16 on CUDA) and the student, in fp32 (master weights), initialised
        # from the teacher's blocks, or from random weights with --unet-config
        teacher = load_pipeline(args.teacher, device=device)
        student = new_unet(args, teacher, device) if args.unet_config else \
            student_from_teacher(teacher.unet, variant(teacher.unet.config, args.variant)).train()
        if rank == 0:  # the checkpoints link to the teacher's other components, saved once as loaded
            write_shared(teacher, args.out)
        teacher.to(dtype=default_dtype(device, training=True))
        # --train-text-encoder: the text encoder learns with the student, in fp32 like it
        text_encoder = (teacher.text_encoder.float().train().requires_grad_(True) if args.train_text_encoder
                        else None)
        models = {"unet": student} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
        trained = [p for model in models.values() for p in model.parameters()]
        optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, fused=cuda)
        state = TrainState(models, optimizer, EMA(student, args.ema_decay) if args.ema_decay else None)
        resume(args, state)
        # Data: this rank's share, from where the run stands
        loader = open_loader(data, teacher, args.teacher, args.data, args.resolution, args.batch_size,
                             args.num_workers, args.seed, args.cache_latents, rank, world)
        report = reporter(args, rank)

    # --plain: no teacher U-Net runs and no features are matched; the denoising loss alone
    teacher_unet = None if args.plain else teacher.unet
    pairs = [] if args.plain else feature_pairs(student.config, teacher.unet.config)
    schedule = NoiseSchedule.from_config(teacher.scheduler_config)

    # The step as it runs: DDP across processes, compiled on CUDA
    if args.gradient_checkpointing:
        student.gradient_checkpointing = True
    model = student if world == 1 else \
        torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None)
    if cuda and not args.no_compile:
        model = torch.compile(model)
        teacher_unet = torch.compile(teacher_unet) if teacher_unet is not None else None
    recipe = KDRecipe(args.lambda_sd, args.lambda_out, args.lambda_feat, args.snr_gamma, args.caption_dropout)
    run = dict(variant=args.variant, teacher=args.teacher, args=json.dumps(vars(args), default=str))
    saves = Checkpoints(args.out, args.keep, run, "train.py",
                        teacher.scheduler_config.get("_class_name", "PNDMScheduler"))

    # One step: accumulate micro-batches, then update; training.loop logs, checks, saves and stops around it
    stream = batches(loader, state)

    def step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, args.lr, args.lr_schedule, args.warmup_steps, args.max_steps)
        for micro in range(accum):
            batch = next(stream)
            # DDP averages gradients across ranks only on the last micro-batch of a step
            sync = micro == accum - 1 or world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                losses = kd_step(batch, teacher, teacher_unet, model, schedule, pairs, recipe,
                                 train_text_encoder=args.train_text_encoder)
                (losses["loss"] / accum).backward()
            meter.add(losses, accum, len(batch["seed"]) * world)
        torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(student)

    def row(logged: dict) -> dict:
        logged.update(lr=optimizer.param_groups[0]["lr"], skipped=loader.dataset.skipped)
        if cuda:
            logged["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return logged

    def validate(at: int) -> None:  # the EMA weights, where there are
        unet = state.ema.as_model(student) if state.ema else student
        shown = Pipeline(teacher.tokenizer, teacher.text_encoder, unet, teacher.vae, teacher.scheduler_config)
        sample_grid(shown, VALID_PROMPTS, args.out / "samples" / f"step-{at:07d}.png", args.resolution)

    log = RunLog(args.out, rank, args.max_steps, state.step, f"distilling {student.config.name}", report)
    meter = LossMeter(device, world)
    try:
        every = Every(args.max_steps, args.log_steps, args.save_steps, args.valid_steps)
        check = probe(Pipeline(teacher.tokenizer, teacher.text_encoder, student, teacher.vae,
                               teacher.scheduler_config), args.resolution)
        finished = loop(state, step, every, saves, log, meter, row, check, validate, rank, world, device)
    except TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    if finished and rank == 0:
        print(f"student after {state.step} steps: {checkpoints(args.out)[-1]} "
              f"(loss curves: {args.out / 'losses.png'})")
    if world > 1:
        dist.destroy_process_group()
    return 0


# what a run folder holds, and --overwrite removes
RUN_OUTPUTS = ("checkpoint-*", ".tmp-checkpoint-*", *SHARED, "log.jsonl", "losses.png", "samples",
               "tensorboard", "run.json")


def run_config(args) -> dict:
    """What defines a run: a re-run in the same --out must match it (training.open_run)."""
    return dict(teacher=args.teacher, variant=args.variant, data=str(args.data), resolution=args.resolution,
                plain=args.plain, unet_config=args.unet_config and str(args.unet_config),
                train_text_encoder=args.train_text_encoder)


def new_unet(args, teacher: Pipeline, device) -> UNet:
    """--unet-config: a new U-Net architecture from random weights, trained from scratch (--plain; the toy
    teacher was made so). It reads the teacher's text states, so it must take their width."""
    unet = UNet(unet_table_from_config(read_json(args.unet_config))).to(device).train()
    if unet.config.context_dim != teacher.unet.config.context_dim:
        raise UsageError(f"--unet-config has cross_attention_dim {unet.config.context_dim}, but the text "
                         f"encoder of {args.teacher} gives {teacher.unet.config.context_dim}-wide states")
    return unet


def resume(args, state: TrainState) -> None:
    """state as the checkpoint left it: the one --resume names, or else the last in --out (a re-run goes
    on)."""
    found = [args.resume] if args.resume else checkpoints(args.out)
    if not found:
        return
    saved = read_training_state(found[-1])
    if saved["variant"] != args.variant or source(saved["teacher"]) != source(args.teacher):
        raise UsageError(f"{found[-1]} is a checkpoint of --variant {saved['variant']} --teacher "
                         f"{saved['teacher']}; give those, or another --out for this run")
    state.restore(found[-1], saved)


def reporter(args, rank: int):
    """TensorBoard or wandb logging when asked for (and installed); otherwise None."""
    if rank != 0 or args.report_to == "none":
        return None
    try:
        if args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(args.out / "tensorboard"))
            return lambda row: [writer.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"]
        import wandb

        wandb.init(project="minisd", config=vars(args), dir=str(args.out))
        return lambda row: wandb.log(row, step=row["step"])
    except ImportError as e:
        raise UsageError(f"--report-to {args.report_to} needs its package: pip install {args.report_to} "
                         f"({e})") from None


if __name__ == "__main__":
    sys.exit(main())
