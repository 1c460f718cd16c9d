"""Personalize a text-to-image model with DreamBooth (Ruiz et al., arXiv 2208.12242): teach it one subject
from a few photos, bound to a rare identifier, with prior preservation, as BK-SDM fine-tunes its compact
models.

    python dreambooth.py --model nota-ai/bk-sdm-small --instance-data data/dog --instance-prompt "a sks dog"
        --class-prompt "a dog" --out weights/dog-bk-small
    python dreambooth.py --model weights/toy-sd --instance-data data/toy-subject
        --instance-prompt "a sks shape" --class-prompt "a shape" --resolution 64 --num-class-images 50
        --class-steps 25 --max-steps 200 --lr 1e-4 --out weights/toy-dreambooth
    python dreambooth.py ... --out weights/dog-bk-small   # re-run: resumes from its last checkpoint

The defaults are BK-SDM's recipe (after diffusers' DreamBooth example): 200 class images generated from the
class prompt by the model itself (`--class-model` for another), prior loss weight 1, 512 px (the model's
native size), batch 1, 800 steps at a constant 1e-6 with no warm-up, AdamW (0.9, 0.999, weight decay 1e-2,
eps 1e-8), gradient clipping 1.0, gradient checkpointing, the text encoder trained too, seed 1234. The loss is
the denoising loss of plain training (minisd/kd_step.py); minisd/dreambooth.py pairs the data and weights the
two halves.

--out is a run folder as train.py's (minisd/training.py: run.json, log.jsonl, atomic checkpoints that resume
exactly); at the end it is also the fine-tuned pipeline itself: `python sample.py "a sks dog on the moon"
--model OUT` and diffusers load it.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from minisd.checkpoints.diffusers import model_index, save_text_encoder, save_unet, write_json
from minisd.cli import (
    UsageError,
    bad_input_exits,
    check_device,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from minisd.data import make_loader
from minisd.dreambooth import (
    PriorPreservation,
    collate_pairs,
    image_files,
    instance_batches,
    make_class_images,
    prompted_folder,
)
from minisd.checkpoints.lora_files import WEIGHT_NAME as LORA_WEIGHTS
from minisd.checkpoints.lora_files import write_lora
from minisd.kd_step import KDRecipe, kd_step
from minisd.lora import inject_lora, lora_layers, lora_parameters, merge_lora, targeted, unmerge_lora
from minisd.pipeline import default_dtype, load_pipeline
from minisd.schedulers import SAMPLERS, NoiseSchedule
from minisd.training import (
    SHARED,
    Checkpoints,
    Every,
    LossMeter,
    RunLog,
    TrainingError,
    TrainState,
    batches,
    check_one_batch,
    checkpoints,
    loop,
    open_run,
    probe,
    read_training_state,
    sample_grid,
    write_shared,
)

PROG = "dreambooth.py"
# what a run folder holds, and --overwrite removes (the class images stay: they can serve the next run)
RUN_OUTPUTS = ("checkpoint-*", ".tmp-checkpoint-*", *SHARED, "unet", "model_index.json", "log.jsonl",
               "losses.png", "samples", "run.json", f"{LORA_WEIGHTS}.safetensors", "lora-kohya.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to personalize: any source sample.py takes")
    p.add_argument("--instance-data", type=Path, required=True, help="a folder of 4-6 photos of the subject")
    p.add_argument("--instance-prompt", required=True, help='the subject and its identifier: "a sks dog"')
    p.add_argument("--class-prompt", help='the subject\'s class: "a dog" (for prior preservation)')
    p.add_argument("--with-prior-preservation", action=argparse.BooleanOptionalAction, default=True,
                   help="train on class images beside the instance images (default: on)")
    p.add_argument("--prior-loss-weight", type=nonnegative_float, default=1.0)
    p.add_argument("--num-class-images", type=positive_int, default=200)
    p.add_argument("--class-data", type=Path,
                   help="class images; the missing ones are generated here, resumably (default "
                        "OUT/class_images)")
    p.add_argument("--class-model", help="the model that draws the class images (default: --model itself)")
    p.add_argument("--class-steps", type=positive_int, default=50, help="sampling steps per class image")
    p.add_argument("--class-guidance", type=finite_float, default=7.5)
    p.add_argument("--class-sampler", choices=SAMPLERS, help="default: the class model's own scheduler")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune the text encoder too (default: on)")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA layers instead of the weights, into one small file "
                        "(pytorch_lora_weights.safetensors)")
    p.add_argument("--rank", type=positive_int, default=16, help="the U-Net's LoRA rank")
    p.add_argument("--alpha", type=positive_float, default=27.0,
                   help="the U-Net's LoRA alpha (the update's scale is alpha/rank)")
    p.add_argument("--lora-targets", nargs="+", default=["to_q", "to_v"],
                   help="the layers that get LoRA, by the end of their names (U-Net and text encoder)")
    p.add_argument("--text-encoder-rank", type=positive_int, default=16)
    p.add_argument("--text-encoder-alpha", type=positive_float, default=17.0)
    p.add_argument("--export-kohya", action="store_true",
                   help="with --lora: also write lora-kohya.safetensors, the layout A1111-style tools read")
    p.add_argument("--lr", type=positive_float,
                   help="constant, no warm-up (default 1e-6, or 1e-4 with --lora)")
    p.add_argument("--max-steps", type=positive_int, default=800)
    p.add_argument("--resolution", type=positive_int,
                   help="a multiple of 8 (default: the model's native size)")
    p.add_argument("--center-crop", action="store_true", help="center instead of random crops")
    p.add_argument("--batch-size", type=positive_int, default=1, help="instance images per step (and as many "
                                                                       "class images)")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-compile", action="store_true", help="no torch.compile (it is on by default on CUDA)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--validation-prompt", help="a row of 4 images of this prompt every --validation-steps")
    p.add_argument("--validation-steps", type=nonnegative_int, default=100)
    p.add_argument("--log-steps", type=positive_int, default=10)
    p.add_argument("--save-steps", type=positive_int, default=200)
    p.add_argument("--keep", type=positive_int, default=2, help="checkpoints to keep")
    p.add_argument("--num-workers", type=nonnegative_int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True, help="the run folder, and at the end the pipeline")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh when it holds another run")
    args = p.parse_args(argv)
    if args.resolution is not None and args.resolution % 8:
        p.error(f"--resolution {args.resolution}: the VAE halves the size 3 times; give a multiple of 8")
    if args.with_prior_preservation and not args.class_prompt:
        p.error('prior preservation (on by default) needs --class-prompt, e.g. --class-prompt "a dog"; or '
                "give --no-with-prior-preservation")
    if args.export_kohya and not args.lora:
        p.error("--export-kohya writes the LoRA in kohya's layout: it needs --lora")
    args.class_data = args.class_data or args.out / "class_images"
    args.lr = args.lr or (1e-4 if args.lora else 1e-6)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with bad_input_exits(PROG):
        device = check_device(args.device)
        image_files(args.instance_data, "--instance-data")
        config = dict(model=args.model, instance_data=str(args.instance_data),
                      instance_prompt=args.instance_prompt,
                      class_prompt=args.class_prompt if args.with_prior_preservation else None,
                      train_text_encoder=args.train_text_encoder, lora=args.lora)
        open_run(args.out, config, args.overwrite, RUN_OUTPUTS)
        pipe = load_pipeline(args.model, device=device, dtype=default_dtype(device))
        if args.lora:
            check_lora_targets(args, pipe)
        size = args.resolution or pipe.native_size
        data = prompted_folder(args.instance_data, args.instance_prompt, "--instance-data", size,
                               args.center_crop, args.seed)
        check_one_batch(data, args.instance_data, args.batch_size)
        collate_fn = instance_batches
        if args.with_prior_preservation:
            load_class_model = (lambda: pipe) if args.class_model is None else \
                (lambda: load_pipeline(args.class_model, device=device, dtype=default_dtype(device)))
            made = make_class_images(load_class_model, args.class_prompt, args.class_data,
                                     args.num_class_images, args.seed, args.class_steps, args.class_guidance,
                                     size, sampler=args.class_sampler)
            print(f"class images: {made} made now, in {args.class_data}")
            # the class half draws its own noise: its sample seeds differ from the instance half's
            prior = prompted_folder(args.class_data, args.class_prompt, "--class-data", size,
                                    args.center_crop, args.seed + 1)
            data = PriorPreservation(data, prior)
            collate_fn = partial(collate_pairs, prior_loss_weight=args.prior_loss_weight)
        if not args.lora:
            write_shared(pipe, args.out)
        models, trained = learners(args, pipe)
        optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                      fused=device.type == "cuda")
        state = TrainState(models, optimizer)
        if found := checkpoints(args.out):  # a re-run goes on from the last checkpoint
            state.restore(found[-1], read_training_state(found[-1]))
        unet = pipe.unet
        loader = make_loader(data, args.batch_size, args.num_workers, pin_memory=device.type == "cuda",
                             collate_fn=collate_fn)

    unet.gradient_checkpointing = args.gradient_checkpointing
    model = torch.compile(unet) if device.type == "cuda" and not args.no_compile else unet
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    scheduler_class = pipe.scheduler_config.get("_class_name", "PNDMScheduler")
    # a full fine-tune's checkpoint is a whole pipeline; a LoRA run's holds the LoRA layers alone
    saves = Checkpoints(args.out, args.keep, dict(args=json.dumps(vars(args), default=str)), PROG,
                        None if args.lora else scheduler_class)
    stream = batches(loader, state)

    def step() -> None:
        batch = next(stream)
        losses = kd_step(batch, pipe, None, model, schedule, [], KDRecipe(),
                         train_text_encoder=args.train_text_encoder)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add(losses, 1, len(batch["seed"]))

    def row(logged: dict) -> dict:
        if device.type == "cuda":
            logged["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return logged | dict(skipped=loader.dataset.skipped)

    def validate(at: int) -> None:  # LoRA merged for the while, so that it samples at full speed
        for model in models.values():
            merge_lora(model)
        sample_grid(pipe, [args.validation_prompt] * 4, args.out / "samples" / f"step-{at:07d}.png", size)
        for model in models.values():
            unmerge_lora(model)

    log = RunLog(args.out, 0, args.max_steps, state.step, "dreambooth", shown=("loss", "peak_mem_gb"),
                 plotted=("loss",))
    meter = LossMeter(device, 1, terms=("loss",))
    try:
        every = Every(args.max_steps, args.log_steps, args.save_steps,
                      args.validation_steps if args.validation_prompt else 0)
        finished = loop(state, step, every, saves, log, meter, row, probe(pipe, size), validate,
                        device=device)
    except TrainingError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if not finished:
        return 0

    write_result(args, pipe, models, scheduler_class)
    print(f"personalized after {state.step} steps: {args.out}")
    return 0


def check_lora_targets(args, pipe) -> None:
    """Before any class image is drawn: every model that gets LoRA layers has layers of those names (conv
    targets alone name none of the text encoder's)."""
    for name in ("unet", "text_encoder") if args.train_text_encoder else ("unet",):
        if not targeted(getattr(pipe, name), args.lora_targets):
            fix = "its attention layers are to_q/to_k/to_v/to_out, its ResBlock convs conv1/conv2"
            if name == "text_encoder":
                fix = "add some of its own (to_q to_v), or give --no-train-text-encoder"
            raise UsageError(f"--lora-targets {' '.join(args.lora_targets)} name no layer of the "
                             f"{name.replace('_', ' ')}: {fix}")


def learners(args, pipe) -> tuple[dict, list]:
    """What learns, by its checkpoint folder (training.TrainState), and the parameters the optimizer steps.
    Full fine-tuning: the U-Net (and text encoder) in fp32, as master weights (bf16 autocast on CUDA), the
    rest frozen in bf16 on CUDA. --lora: every weight frozen (bf16 on CUDA), and fp32 LoRA layers injected on
    --lora-targets of the U-Net (and text encoder): all that learns."""
    device = pipe.device
    pipe.to(dtype=default_dtype(device, training=True))
    parts = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if args.train_text_encoder else {})
    if not args.lora:
        models = {name: model.float().train().requires_grad_(True) for name, model in parts.items()}
        return models, [p for model in models.values() for p in model.parameters()]
    ranks = {"unet": (args.rank, args.alpha),
             "text_encoder": (args.text_encoder_rank, args.text_encoder_alpha)}
    for name, model in parts.items():
        model.requires_grad_(False).train()
        inject_lora(model, args.lora_targets, *ranks[name], dtype=torch.float32)
    models = {f"{name}_lora": model for name, model in parts.items()}
    return models, [p for model in models.values() for p in lora_parameters(model)]


def write_result(args, pipe, models: dict, scheduler_class: str) -> None:
    """Full fine-tuning: the run folder becomes the pipeline, its U-Net (and text encoder) beside the shared
    parts. --lora: the LoRA in diffusers' layout (and kohya's, with --export-kohya)."""
    if not args.lora:
        save_unet(pipe.unet, args.out / "unet")
        if args.train_text_encoder:
            save_text_encoder(pipe.text_encoder, args.out / "text_encoder")
        write_json(args.out / "model_index.json", model_index(scheduler_class))
        return
    components = {name.removesuffix("_lora"): model for name, model in models.items()}
    lora = {name: lora_layers(model) for name, model in components.items()}
    write_lora(args.out / f"{LORA_WEIGHTS}.safetensors", lora, components, "diffusers")
    if args.export_kohya:
        write_lora(args.out / "lora-kohya.safetensors", lora, components, "kohya")


if __name__ == "__main__":
    sys.exit(main())
