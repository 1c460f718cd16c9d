"""The toy world's command line: write a data set, score images against their captions, set up a teacher's
training, or run the distillation ablation, the few-step (LCM) table or DreamBooth on the toy models.

    python -m minisd.toy data --out data/toy --n 20000 --seed 0 --heldout 0.1
    python -m minisd.toy check --images data/toy/heldout
    python -m minisd.toy check --images results/toy/im512 --metadata data/toy/heldout/metadata.csv
    python -m minisd.toy configs --out data/toy-configs              # vae.json, unet.json, text_encoder.json
    python -m minisd.toy init --vae weights/toy-sd/vae --out data/toy-init
        # random U-Net and text tower + the VAE
    python -m minisd.toy export --checkpoint weights/toy-teacher/checkpoint-0001500 --out weights/toy-sd
    python -m minisd.toy ablation --teacher weights/toy-sd --data data/toy --out results/toy-ablation
    python -m minisd.toy lcm --teacher weights/toy-sd --data data/toy --out results/toy-lcm
    python -m minisd.toy dreambooth --model weights/toy-sd --out results/toy-dreambooth
    python -m minisd.toy probe --model weights/toy-sd --data data/toy/train    # does it read position words?
    python -m minisd.toy probe --vae weights/toy-sd/vae --data data/toy/heldout --out results/toy-vae
        # its reconstructions' caption accuracy

`check` prints the share of images whose stated colours, shapes, sizes, count and position or relation the
pixel checker finds, and the share with all of them (caption accuracy). Images of any size are scaled to 64 px
first.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from minisd.cli import finite_float, nonnegative_float, positive_float, positive_int
from minisd.toy.captions import parse_caption
from minisd.toy.checker import check_folder
from minisd.toy.dataset import write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minisd.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write train/ and heldout/ splits of toy images")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--n", type=positive_int, default=20000, help="images in all, both splits")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--heldout", type=nonnegative_float, default=0.1,
                      help="share of images in heldout/ (0 for none)")
    check = commands.add_parser("check", help="score images against their captions")
    check.add_argument("--images", type=Path, required=True)
    check.add_argument("--metadata", type=Path, help="file_name,text CSV (default: IMAGES/metadata.csv)")
    for command in (data, check):
        command.add_argument("--workers", type=positive_int, default=len(os.sched_getaffinity(0)),
                             help="processes")
    configs = commands.add_parser("configs", help="write the toy models' configs (train_vae.py --config, "
                                                  "train.py --unet-config)")
    configs.add_argument("--out", type=Path, required=True)
    init = commands.add_parser("init",
                               help="a pipeline folder with a random toy U-Net and text tower, to train "
                                            "a teacher from (train.py --plain --train-text-encoder --teacher "
                                            "OUT)")
    init.add_argument("--vae", type=Path, required=True, help="the trained toy VAE (train_vae.py --out)")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--widths", type=positive_int, nargs=4, metavar="C",
                      help="the U-Net's four stage widths, multiples of 16 (default: the shipped "
                           "32 64 96 96)")
    init.add_argument("--text-layers", type=positive_int, help="the text tower's depth (default: 4)")
    init.add_argument("--sd-schedule", action="store_true",
                      help="SD-v1's PNDM schedule instead of the toy one (zero terminal SNR, DDIM trailing)")
    init.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="v_prediction",
                      help="what the U-Net learns to predict: the velocity (SD-v2; the only choice on a zero "
                           "terminal SNR schedule) or, with --sd-schedule, the noise (SD-v1)")
    export = commands.add_parser("export", help="a checkpoint of train.py as a standalone pipeline folder")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                        help="weights as stored (fp16: half)")
    export.add_argument("--vae", type=Path,
                        help="ship this VAE instead of the run's: a decoder fine-tuned from it "
                             "(train_vae.py --decoder-only); its encoder must be the run's")
    ablation = commands.add_parser("ablation",
                                   help="train base/small/tiny students and the KD ablation, then "
                                                    "sample, score and tabulate them "
                                                    "(minisd/toy/ablation.py)")
    ablation.add_argument("--teacher", type=Path, default=Path("weights/toy-sd"))
    ablation.add_argument("--data", type=Path, default=Path("data/toy"),
                          help="written by `data` (train/, heldout/)")
    ablation.add_argument("--out", type=Path, default=Path("results/toy-ablation"))
    ablation.add_argument("--steps", type=positive_int, default=250, help="training steps of every student")
    ablation.add_argument("--batch-size", type=positive_int, default=32)
    ablation.add_argument("--lr", type=positive_float, default=5e-4)
    ablation.add_argument("--seed", type=int, default=0)
    ablation.add_argument("--prompts", type=positive_int, default=200,
                          help="held-out prompts each model is scored on")
    lcm = commands.add_parser("lcm", help="LCM-distill a tiny student (train_lcm.py), then sample, score and "
                                          "tabulate it at 1-8 steps beside 25 steps of the teacher's "
                                          "own sampler (minisd/toy/lcm.py)")
    lcm.add_argument("--teacher", type=Path, default=Path("weights/toy-sd"))
    lcm.add_argument("--data", type=Path, default=Path("data/toy"),
                     help="written by `data` (train/, heldout/)")
    lcm.add_argument("--out", type=Path, default=Path("results/toy-lcm"))
    lcm.add_argument("--student", type=Path,
                     help="a tiny student made already (e.g. the ablation's OUT/tiny/checkpoint-0000250); "
                          "default: train one as the ablation's tiny run")
    lcm.add_argument("--steps", type=positive_int, default=400,
                     help="training steps of each LCM distillation (their other flags: minisd/toy/lcm.py)")
    lcm.add_argument("--batch-size", type=positive_int, default=32)
    lcm.add_argument("--no-lora", action="store_true", help="leave out the LCM-LoRA")
    lcm.add_argument("--no-self", action="store_true",
                     help="leave out the student's LCD on its own trajectories (tiny-lcm-self)")
    lcm.add_argument("--teacher-lcm", action="store_true", help="LCM-distill the teacher too")
    lcm.add_argument("--seed", type=int, default=0)
    lcm.add_argument("--prompts", type=positive_int, default=100,
                     help="held-out prompts each row is scored on")
    dreambooth = commands.add_parser("dreambooth",
                                     help="DreamBooth on a subject the model has never drawn: full, LoRA "
                                          "and LoCon, with and without prior preservation, then sample, "
                                          "score and tabulate them (minisd/toy/personalization.py)")
    dreambooth.add_argument("--model", type=Path, default=Path("weights/toy-sd"),
                            help="the toy pipeline folder to personalize (a teacher or a student)")
    dreambooth.add_argument("--out", type=Path, default=Path("results/toy-dreambooth"))
    dreambooth.add_argument("--steps", type=positive_int, default=300, help="training steps of every run")
    dreambooth.add_argument("--lr", type=positive_float, default=2e-4, help="full fine-tuning's")
    dreambooth.add_argument("--lora-lr", type=positive_float, default=2e-3,
                            help="LoRA's and LoCon's (docs/personalization.md: how it was chosen)")
    dreambooth.add_argument("--seed", type=int, default=1234)
    dreambooth.add_argument("--prompts", type=positive_int, default=32,
                            help="new contexts each model draws, with and without the identifier")
    dreambooth.add_argument("--repeats", type=positive_int, default=16,
                            help="images each model draws of the instance prompt, and of the class prompt")
    dreambooth.add_argument("--class-images", type=positive_int, default=50)
    probe = commands.add_parser("probe", help="without sampling: how much a model's denoising loss rises "
                                              "when its captions' position words are swapped, or how "
                                              "often a VAE's reconstructions pass the caption check "
                                              "(minisd/toy/probes.py)")
    probed = probe.add_mutually_exclusive_group(required=True)
    probed.add_argument("--model", type=Path, help="a toy pipeline folder (or train.py checkpoint)")
    probed.add_argument("--vae", type=Path, help="a VAE folder")
    probe.add_argument("--data", type=Path, required=True,
                       help="a split written by `data` (train/ for --model, heldout/ for --vae)")
    probe.add_argument("--count", type=positive_int, default=256, help="images of the split")
    probe.add_argument("--timesteps", type=positive_int, nargs="+", default=[961, 850, 700, 500],
                       help="with --model")
    probe.add_argument("--out", type=Path, default=Path("results/toy-vae"),
                       help="with --vae: where the reconstructions go")
    for command in (ablation, dreambooth):  # both sample their models the same way
        command.add_argument("--sample-steps", type=positive_int, default=25,
                             help="steps of the model's own sampler (its scheduler/: DDIM for toy-sd)")
        command.add_argument("--guidance", type=finite_float,
                             help="classifier-free guidance (default: configs.TOY_GUIDANCE)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command in ("configs", "init", "export", "ablation", "lcm", "dreambooth", "probe"):
        return tools(args)
    if args.command == "data":
        if not 0 <= args.heldout < 1 or args.n < 1:
            fail("need --n >= 1 and 0 <= --heldout < 1")
        info = write_dataset(args.out, args.n, args.seed, args.heldout, args.workers)
        print(f"wrote {info['counts']} to {args.out} in {time.perf_counter() - start:.1f} s; "
              f"held-out pairs {info['heldout_pairs']}")
        return
    from minisd.data import read_metadata  # not above: spawned workers import this module again, torch-free

    rows = read_metadata(args.metadata or args.images / "metadata.csv")
    for file_name, text in rows:  # here, not in a worker: a caption the checker cannot read is a bad input
        try:
            parse_caption(text)
        except ValueError as e:
            fail(f"{file_name}: the checker cannot read its caption ({e}); give captions in the toy world's "
                 "grammar, e.g. 'a big red circle above a small blue square' (size words may be left out)")
    totals = check_folder(args.images, rows, args.workers)
    for name in ("colour", "shape", "size", "count", "position", "relation", "caption_correct"):
        right, judged = totals.get(name, (0, 0))
        if judged:
            print(f"{name:16s} {right / judged:7.2%}  ({right}/{judged})")
    print(f"checked {totals['caption_correct'][1]} images in {time.perf_counter() - start:.1f} s")


def tools(args) -> None:
    """The model subcommands: their imports (torch and the models) stay out of `data` and `check`."""
    from minisd.toy import ablation, configs

    if args.command == "configs":
        from minisd.checkpoints.diffusers import unet_config_from_table, write_json

        write_json(args.out / "vae.json", configs.TOY_VAE)
        write_json(args.out / "unet.json", unet_config_from_table(configs.TOY_UNET))
        write_json(args.out / "text_encoder.json", configs.TOY_TEXT.to_transformers())
        print(f"wrote vae.json, unet.json and text_encoder.json to {args.out}")
    elif args.command == "init":
        if args.widths and any(w % configs.HEAD_WIDTH for w in args.widths):
            fail(f"--widths {' '.join(map(str, args.widths))}: give multiples of {configs.HEAD_WIDTH} "
                 "(the attention heads are 16 wide)")
        if args.prediction_type == "epsilon" and not args.sd_schedule:
            fail("--prediction-type epsilon needs --sd-schedule: on the toy schedule (zero terminal SNR) the "
                 "noise is undefined at t = T")
        require(args.vae, "config.json",
                "a VAE folder: train one with train_vae.py --config data/toy-configs/vae.json "
                                          "(see weights/toy-sd/README.md)")
        folder = configs.initial_pipeline(args.vae, args.out, args.seed, args.widths and tuple(args.widths),
                                          args.text_layers, args.sd_schedule, args.prediction_type)
        print(f"random toy pipeline with the VAE of {args.vae}: {folder}")
    elif args.command == "export":
        require(args.checkpoint, "unet", "a train.py checkpoint folder (checkpoint-NNNNNNN)")
        if args.vae:
            require(args.vae, "config.json", "a VAE folder (train_vae.py --out)")
        try:
            folder = configs.export(args.checkpoint, args.out, args.dtype, args.vae)
        except ValueError as error:
            fail(str(error))
        print(f"exported {args.checkpoint}: {folder}")
    elif args.command == "lcm":
        from minisd.toy.lcm import run_lcm

        require(args.teacher, "model_index.json", "a pipeline folder, e.g. weights/toy-sd")
        if args.student:
            require(args.student, "model_index.json", "a pipeline folder (a train.py checkpoint)")
        require(args.data, "heldout/metadata.csv", f"a toy data set (train/ and heldout/): write one with "
                                                    f"python -m minisd.toy data --out {args.data}")
        table = run_lcm(args.teacher, args.data, args.out, args.student, lcd_steps=args.steps,
                        batch=args.batch_size, seed=args.seed, prompts=args.prompts, lora=not args.no_lora,
                        self_lcm=not args.no_self, teacher_lcm=args.teacher_lcm,
                        guidance=configs.TOY_GUIDANCE)
        print((args.out / "results.md").read_text())
        print(f"{len(table)} rows scored; grid of samples: {args.out / 'grid.png'}")
    elif args.command == "dreambooth":
        from minisd.toy.personalization import run_toy_dreambooth

        require(args.model, "model_index.json", "a pipeline folder, e.g. weights/toy-sd")
        require(Path("."), "dreambooth.py", "the repository root: run the toy DreamBooth from there")
        results = run_toy_dreambooth(args.model, args.out, args.steps, args.lr, args.lora_lr, args.seed,
                                     args.prompts, args.repeats, args.class_images, args.sample_steps,
                                     args.guidance or configs.TOY_GUIDANCE)
        print((args.out / "results.md").read_text())
        print(f"{len(results['table'])} models scored; grid of samples: {args.out / 'grid.png'}")
    elif args.command == "probe":
        probe(args)
    else:
        require(args.teacher, "model_index.json", "a pipeline folder, e.g. weights/toy-sd")
        require(args.data, "heldout/metadata.csv", f"a toy data set (train/ and heldout/): write one with "
                                                    f"python -m minisd.toy data --out {args.data}")
        table = ablation.run_ablation(args.teacher, args.data, args.out, args.steps, args.batch_size, args.lr,
                                      args.seed, args.prompts, args.sample_steps,
                                      args.guidance or configs.TOY_GUIDANCE)
        print((args.out / "results.md").read_text())
        print(f"{len(table)} models scored; grid of samples: {args.out / 'grid.png'}")


def probe(args) -> None:
    from minisd.toy import probes

    require(args.data, "scenes.jsonl",
            "a split written by python -m minisd.toy data (its train/ or heldout/)")
    if args.vae:
        from minisd.checkpoints.diffusers import load_vae

        require(args.vae, "config.json", "a VAE folder")
        vae = load_vae(args.vae).float().eval()
        scores = probes.vae_reconstructions(vae, args.data, args.out, args.count)
        print(f"{scores['images']} reconstructions in {args.out}: caption accuracy "
              f"{scores['caption_accuracy']:.1%}; " +
              ", ".join(f"{name} {value:.1%}" for name, value in scores["accuracy"].items()))
        return
    import torch

    from minisd.pipeline import load_pipeline

    require(args.model, "unet", "a pipeline folder or train.py checkpoint")
    pipe = load_pipeline(args.model)
    pipe.to(dtype=torch.float32)  # fp16 weights are upcast, as sampling does on the CPU
    print(f"{'t':>5} {'loss':>8} {'swapped':>8} {'other':>8} {'empty':>8}"
          "   (rise over the loss with the captions' own words)")
    for row in probes.caption_use(pipe, args.data, tuple(args.timesteps), args.count):
        print(f"{row['t']:5d} {row['loss']:8.5f} " +
              " ".join(f"{row[name]:+8.1%}" for name in ("swapped", "other", "empty")))
    print(f"over {row['images']} images whose captions state a position or relation")


def require(folder: Path, inside: str, what: str) -> None:
    if not (folder / inside).exists():
        fail(f"{folder} is not {what} (it has no {inside})")


def fail(message: str) -> None:
    """A bad input: one line, exit code 2, as every minisd command."""
    print(f"python -m minisd.toy: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
