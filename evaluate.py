"""BK-SDM's zero-shot MS-COCO protocol (docs/bksdm.md, "The evaluation protocol"): generate, then score.

    python evaluate.py --model nota-ai/bk-sdm-small --prompts data/mscoco_val2014_30k/metadata.csv \
        --out results/bk-small --fid-stats real_im256.npz
    python evaluate.py --model weights/my-run/checkpoint-0050000 --prompts ... --out results/mine --num 1000
    torchrun --nproc_per_node=8 evaluate.py --model ... --prompts ... --out results/bk-small
        --fid-stats real_im256.npz
    python evaluate.py --fid-stats-from data/mscoco_val2014 --save-stats real_im256.npz
        # real-image statistics
    python evaluate.py --model weights/toy-sd --prompts data/toy/heldout/metadata.csv --out results/toy-sd
        # toy world
    python evaluate.py --protocol dreambooth --subjects data/dreambooth/dataset \
        --models "runs/bk-small-db/{subject}" --out results/bk-small-db    # DreamBooth: DINO, CLIP-I, CLIP-T

One 512 px image per prompt (PNDM, 25 steps, guidance 7.5), saved as results/NAME/im512/FILE_NAME,
and its 256 px copy, resized as the protocol does (PIL bicubic, squashed, not cropped), as
results/NAME/im256/FILE_NAME. Images already on disk are skipped, so an interrupted run resumes.
Under torchrun each process takes its own contiguous slice, and the first one scores the whole set.

Scores, on the im256 copies: FID (pytorch-fid's Inception and statistics), IS (torch-fidelity's
convention) and CLIP score (open_clip ViT-g-14 laion2b_s34b_b88k), written to results/NAME/scores.json
with a Markdown row of the paper's table (scores.md) and grid.png of the first 16 images. Prompts
of the toy world (a folder with scenes.jsonl) are scored by its pixel checker instead.

--protocol dreambooth (minisd/dreambooth_eval.py): each subject's fine-tuned model makes 4 images of each of
its 25 prompts into results/NAME/images/SUBJECT/PP-K.png (resumable, torchrun-sliced as above); scored with
DINO, CLIP-I and CLIP-T against the subject's photos, with the real-vs-real upper bound; scores.json,
scores.md and grids/SUBJECT.png. --images DIR scores images made elsewhere, named the same way.
"""

import argparse
import csv
import json
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

from minisd import dreambooth_data, dreambooth_eval, evaluation
from minisd.cli import (
    BAD_INPUT,
    UsageError,
    check_device,
    check_writable_folder,
    finite_float,
    positive_int,
    unit_float,
    write_error,
)
from minisd.data import read_metadata
from minisd.pipeline import DTYPES, default_dtype, load_pipeline
from minisd.schedulers import SAMPLERS
from minisd.toy.metric import evaluate_folder

METRICS = ("fid", "is", "clip", "toy")
# each protocol's CLIP (--clip-model, --clip-pretrained): BK-SDM's; OpenAI's ViT-B/32 for DreamBooth
CLIP_DEFAULTS = {"mscoco": ("ViT-g-14", "laion2b_s34b_b88k"),
                 "dreambooth": (dreambooth_eval.CLIP_MODEL, dreambooth_eval.CLIP_PRETRAINED)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(CLIP_DEFAULTS), default="mscoco",
                   help="mscoco: BK-SDM's zero-shot MS-COCO scores; dreambooth: the personalization scores")
    p.add_argument("--model", "--models", dest="model",
                   help="hub id, diffusers folder, single file, or a train.py checkpoint; for --protocol "
                        "dreambooth one per subject, named by a pattern with {subject}: runs/db-{subject}")
    p.add_argument("--prompts", type=Path, help="metadata.csv with file_name,text (or metadata.jsonl); for "
                                                "--protocol dreambooth prompts_and_classes.txt (default: in "
                                                "--subjects)")
    p.add_argument("--out", type=Path,
                   help="results folder: im512/, im256/, scores.json, scores.md, grid.png")
    p.add_argument("--num", type=positive_int, default=None, help="only the first N prompts")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance", type=finite_float, default=7.5)
    p.add_argument("--guidance-rescale", type=unit_float, default=0.0, metavar="PHI",
                   help="CFG rescale, as sample.py's (default 0: plain CFG)")
    p.add_argument("--scheduler", choices=SAMPLERS, default=None, help="default: the model's (PNDM for SD)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="generated size, a multiple of 8 (default: the model's, 512 for SD-v1)")
    p.add_argument("--eval-size", type=positive_int, default=None,
                   help="size of the copies the scores read (256; the toy "
                                                                "world: its 64)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seed-mode", choices=["per_prompt", "single"], default="per_prompt",
                   help="per_prompt: prompt i uses seed+i, so images do not depend on batch size or GPU "
                        "count; single: one generator for the whole run, as BK-SDM's script (use "
                        "--batch-size 1, no resume)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    scoring = p.add_argument_group("scores")
    scoring.add_argument("--metrics", default=None, help=f"comma-separated, of {','.join(METRICS)}, or none "
                         "(default: is,clip, plus fid with --fid-stats; toy for toy-world prompts)")
    scoring.add_argument("--fid-stats", type=Path,
                         help="real-image statistics (.npz with mu, sigma), e.g. BK-SDM's "
                                                        "real_im256.npz")
    scoring.add_argument("--inception-weights", type=Path, help="pt_inception-2015-12-05-6726825d.pth "
                                                                "(default: weights/metrics/, downloaded when "
                                                                "online)")
    scoring.add_argument("--clip-model", help="open_clip model name, or a local weight file/folder "
                                              "(default: ViT-g-14; ViT-B-32-quickgelu for dreambooth)")
    scoring.add_argument("--clip-pretrained", help="open_clip pretrained tag (default: laion2b_s34b_b88k; "
                                                   "openai for dreambooth)")
    scoring.add_argument("--score-batch-size", type=positive_int, default=50)
    scoring.add_argument("--name", default=None,
                         help="the model's name in the table row (default: --out's name)")
    stats = p.add_argument_group("real-image statistics")
    stats.add_argument("--fid-stats-from", type=Path,
                       help="a folder of real images: resize each to --eval-size "
                                                           "(bicubic, squashed) and write FID statistics")
    stats.add_argument("--save-stats", type=Path, help="where --fid-stats-from writes (.npz)")
    db = p.add_argument_group("DreamBooth protocol (--protocol dreambooth)")
    db.add_argument("--subjects", type=Path,
                    help="google/dreambooth's dataset/: a folder of photos per subject, and "
                         "prompts_and_classes.txt")
    db.add_argument("--images", type=Path, help="score these already generated images (SUBJECT/PP-K.png) "
                                                "instead of generating")
    db.add_argument("--identifier", default="sks",
                    help="the fine-tuned models' rare token ({0} of the prompts)")
    db.add_argument("--images-per-prompt", type=positive_int, default=4)
    db.add_argument("--dino-weights", type=Path,
                    help="dino_deitsmall16_pretrain.pth or a facebook/dino-vits16 folder (default: "
                         "weights/metrics/, else the hub repo, downloaded when online)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.clip_model = args.clip_model or CLIP_DEFAULTS[args.protocol][0]
    args.clip_pretrained = args.clip_pretrained or CLIP_DEFAULTS[args.protocol][1]
    if args.protocol == "dreambooth":
        if not (args.subjects and (args.model or args.images) and args.out):
            p.error("--protocol dreambooth needs --subjects DIR, --models PATTERN (or --images DIR) and "
                    "--out DIR")
        if not args.identifier.strip():
            p.error("--identifier is blank; the fine-tuned models know their subject by it (e.g. sks)")
    elif args.fid_stats_from:
        if not args.save_stats:
            p.error("--fid-stats-from needs --save-stats FILE.npz")
    elif not (args.model and args.prompts and args.out):
        p.error("--model, --prompts and --out are required (or --fid-stats-from DIR --save-stats FILE.npz)")
    if args.size is not None and args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE's downsampling), not {args.size}")
    return args


def read_prompts(path: Path, num: int | None = None) -> list[tuple[str, str]]:
    """The first `num` (file_name, text) rows of --prompts, each checked (evaluation.check_rows)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} "
                                "(BK-SDM's is data/mscoco_val2014_30k/metadata.csv)")
    not_text = UsageError(f"--prompts {path} is not a UTF-8 text file: it takes a metadata.csv (a header "
                          "with file_name,text) or a metadata.jsonl")
    with open(path, "rb") as f:
        if b"\0" in f.read(1 << 16):  # a binary file, as git tells them: NUL bytes near the start
            raise not_text
    try:
        rows = read_metadata(path)[:num]
    except (UnicodeDecodeError, csv.Error):
        raise not_text from None
    except ValueError as e:
        raise UsageError(f"{str(e).splitlines()[0]} --prompts takes a metadata.csv (expected a header with "
                         "file_name,text) or a metadata.jsonl") from None
    evaluation.check_rows(path, rows)
    return rows


def choose_metrics(args) -> set[str]:
    """--metrics as given, else the protocol's scores that can run: FID only with a statistics file."""
    if args.metrics is not None:
        chosen = set() if args.metrics == "none" else {m.strip() for m in args.metrics.split(",")
                                                       if m.strip()}
        unknown = chosen - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {','.join(METRICS)} or none")
    elif (args.prompts.parent / "scenes.jsonl").is_file():
        chosen = {"toy"}
    else:
        chosen = {"is", "clip"} | ({"fid"} if args.fid_stats else set())
    if "fid" in chosen and not args.fid_stats:
        raise ValueError("FID needs real-image statistics: pass --fid-stats real_im256.npz (BK-SDM's, or "
                         "build one with --fid-stats-from DIR --save-stats FILE.npz)")
    if args.fid_stats and not args.fid_stats.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {args.fid_stats}. Build it from a folder of "
                                "real images with `python evaluate.py --fid-stats-from DIR --save-stats "
                                "FILE.npz`")
    return chosen


def choose_dreambooth_metrics(args) -> set[str]:
    """--metrics as given (of dino, clip), else both."""
    if args.metrics is None:
        return set(dreambooth_eval.METRICS)
    chosen = set() if args.metrics == "none" else {m.strip() for m in args.metrics.split(",") if m.strip()}
    unknown = chosen - set(dreambooth_eval.METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)} for --protocol dreambooth; choose from "
                         f"{','.join(dreambooth_eval.METRICS)} or none")
    return chosen


def wait_for_all(world: int) -> None:
    """Under torchrun, return once every process has made its slice: the first then scores the whole set."""
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=1))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.protocol == "dreambooth":
        return dreambooth(args, rank, world)
    try:  # every input, and the metric networks' weights, are checked before the first image is made
        device = check_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda"
                              else args.device)
        if args.fid_stats_from:
            check_writable_folder(args.save_stats.parent, "--save-stats")
            path = evaluation.real_stats(args.fid_stats_from, args.save_stats, args.eval_size or 256,
                                         args.inception_weights, args.score_batch_size, device,
                                         not args.no_progress)
            print(f"wrote FID statistics of {args.fid_stats_from} to {path}")
            return 0
        rows = read_prompts(args.prompts, args.num)
        metrics = choose_metrics(args)
        check_writable_folder(args.out)
        inception_weights = evaluation.check_metric_weights(metrics, args.inception_weights, args.clip_model,
                                                            args.clip_pretrained)
        dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
        size = args.size or pipe.native_size
        eval_size = args.eval_size or min(256, size)
        if "fid" in metrics:
            evaluation.check_stats(args.fid_stats, eval_size)
    except BAD_INPUT as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2

    per_rank = -(-len(rows) // world)  # ceil
    mine = list(range(rank * per_rank, min(len(rows), (rank + 1) * per_rank)))
    folders = {args.out / "im512": None, args.out / evaluation.SCORE_FOLDER: eval_size}
    try:
        made, seconds = evaluation.generate(pipe, rows, mine, folders, steps=args.steps,
                                            guidance=args.guidance, guidance_rescale=args.guidance_rescale,
                                            seed=args.seed, seed_mode=args.seed_mode,
                                            size=size, batch_size=args.batch_size, scheduler=args.scheduler,
                                            progress=rank == 0 and not args.no_progress)
    except OSError as e:  # a full disk: the images written so far stay, and a re-run makes only the rest
        print(f"\nevaluate.py: error: {write_error(e, args.out)}; a re-run goes on from the images made",
              file=sys.stderr)
        return 1
    print(f"rank {rank}: {len(mine)} images in {args.out / evaluation.SCORE_FOLDER} ({made} generated now)")
    wait_for_all(world)
    if rank != 0:
        return 0

    scores = {"model": str(args.model), "num_images": len(rows), "steps": args.steps,
              "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
              "scheduler": args.scheduler or pipe.scheduler.__class__.__name__, "seed": args.seed,
              "seed_mode": args.seed_mode, "size": size, "eval_size": eval_size,
              "dtype": args.dtype or
              {v: k for k, v in DTYPES.items()}[dtype], **evaluation.parameter_counts(pipe),
              "generation": evaluation.generation_record(args.out, made, seconds, args.batch_size, world,
                                                         device)}
    del pipe  # the metric networks need the memory more
    try:
        # the toy world's prompts are scored by its pixel checker, against the real images beside them
        toy = partial(evaluate_folder, real_dir=args.prompts.parent)
        scores.update(evaluation.compute_scores(
            args.out, rows, metrics, eval_size, device, fid_stats=args.fid_stats,
            inception_weights=inception_weights, clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained, batch_size=args.score_batch_size, others={"toy": toy},
            progress=not args.no_progress))
    except BAD_INPUT as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    row = evaluation.write_scores(args.out, args.name or args.out.name, scores)
    evaluation.prompt_grid(args.out, rows).save(args.out / "grid.png")
    print(json.dumps({k: v for k, v in scores.items() if not isinstance(v, dict)}, indent=1))
    print(row)
    return 0


def dreambooth(args, rank: int, world: int) -> int:
    """--protocol dreambooth: check every input, generate this process's slice, then (the first process)
    score the whole set, as main does for MS-COCO."""
    try:
        device = check_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda"
                              else args.device)
        prompts_file = args.prompts or args.subjects / dreambooth_data.PROMPTS_FILE
        prompts = dreambooth_data.read_prompts_file(prompts_file)
        subjects = dreambooth_data.read_subjects(args.subjects, prompts)
        rows = dreambooth_data.expand(subjects, prompts, args.identifier, args.images_per_prompt)
        metrics = choose_dreambooth_metrics(args)
        check_writable_folder(args.out)
        dino_weights = dreambooth_eval.check_metric_weights(metrics, args.dino_weights, args.clip_model,
                                                            args.clip_pretrained)
        dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
        per_rank = -(-len(rows) // world)  # ceil
        mine = list(range(rank * per_rank, min(len(rows), (rank + 1) * per_rank)))
        folder, pipe = args.images, None
        if folder is not None:
            dreambooth_eval.image_files(folder, rows)
        else:
            folder = args.out / dreambooth_eval.IMAGES
            sources = dreambooth_eval.model_sources(args.model, subjects)
            first = sources[rows[mine[0]].subject if mine else subjects[0].name]  # this process's first model
            pipe = load_pipeline(first, device=device, dtype=dtype)
    except BAD_INPUT as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2

    scores = {"protocol": "dreambooth", "subjects_dir": str(args.subjects), "prompts": str(prompts_file),
              "images_dir": str(folder), "identifier": args.identifier, "num_subjects": len(subjects),
              "images_per_prompt": args.images_per_prompt, "num_images": len(rows)}
    if pipe is not None:
        def load(source):  # a later subject's model that does not load stops the run with one line
            try:
                return load_pipeline(source, device=device, dtype=dtype)
            except BAD_INPUT as e:
                raise UsageError(str(e)) from None

        size = args.size or pipe.native_size
        scores |= {"model": args.model, "steps": args.steps, "guidance": args.guidance,
                   "guidance_rescale": args.guidance_rescale,
                   "scheduler": args.scheduler or pipe.scheduler.__class__.__name__, "seed": args.seed,
                   "seed_mode": args.seed_mode, "size": size,
                   "dtype": args.dtype or {v: k for k, v in DTYPES.items()}[dtype],
                   **evaluation.parameter_counts(pipe)}
        models = {first: pipe}
        del pipe  # `models` holds the only reference: generate frees it when the next subject's model loads
        try:
            made, seconds = dreambooth_eval.generate(
                folder, rows, mine, sources, load, models, steps=args.steps, guidance=args.guidance,
                guidance_rescale=args.guidance_rescale,
                seed=args.seed, seed_mode=args.seed_mode, size=size, batch_size=args.batch_size,
                scheduler=args.scheduler, progress=rank == 0 and not args.no_progress)
        except UsageError as e:
            print(f"\nevaluate.py: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a full disk: the images written so far stay, and a re-run makes only the rest
            print(f"\nevaluate.py: error: {write_error(e, folder)}; a re-run goes on from the images made",
                  file=sys.stderr)
            return 1
        del models  # the metric networks need the memory more
        print(f"rank {rank}: {len(mine)} images in {folder} ({made} generated now)")
        wait_for_all(world)
        if rank != 0:
            return 0
        scores["generation"] = evaluation.generation_record(args.out, made, seconds, args.batch_size, world,
                                                            device)
    elif rank != 0:
        return 0
    try:
        files = dreambooth_eval.image_files(folder, rows)
        scores.update(dreambooth_eval.compute_scores(
            files, rows, subjects, metrics, device, dino_weights=dino_weights, clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained, batch_size=args.score_batch_size,
            progress=not args.no_progress))
    except BAD_INPUT as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    row = evaluation.write_scores(args.out, args.name or args.out.name, scores,
                                  table=dreambooth_eval.markdown_rows)
    dreambooth_eval.subject_grids(args.out / "grids", files, rows, subjects)
    print(json.dumps({k: v for k, v in scores.items() if not isinstance(v, dict)}, indent=1))
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
