"""Generate the images of BK-SDM's zero-shot MS-COCO protocol (shared/BKSDM.md, "Evaluation protocol").

    python evaluate.py --model nota-ai/bk-sdm-small --prompts data/mscoco_val2014_30k/metadata.csv --out results/bk-small
    python evaluate.py --model weights/my-run/checkpoint-0050000 --prompts ... --out results/mine --num 1000
    torchrun --nproc_per_node=8 evaluate.py --model ... --prompts ... --out results/bk-small

One 512 px image per prompt (PNDM, 25 steps, guidance 7.5), saved as results/NAME/im512/FILE_NAME,
and its 256 px copy, resized as the protocol does (PIL bicubic, squashed, not cropped), as
results/NAME/im256/FILE_NAME. Images already on disk are skipped, so an interrupted run resumes.
Under torchrun each process takes its own contiguous slice of the prompts.

Scores (FID, IS, CLIP score) are computed on the im256 folder; minisd's metric networks are not
part of this script yet.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minisd.checkpoints.remap import CheckpointError
from minisd.pipeline import DTYPES, load_pipeline
from minisd.schedulers import SAMPLERS


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(file_name, text) rows of a metadata.csv with a `file_name,text` header."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (BK-SDM's is data/mscoco_val2014_30k/metadata.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"file_name", "text"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path} has columns {reader.fieldnames}; expected a header with file_name,text")
        return [(row["file_name"], row["text"]) for row in reader]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, diffusers folder, single file, or a train.py checkpoint")
    p.add_argument("--prompts", type=Path, required=True, help="metadata.csv with file_name,text")
    p.add_argument("--out", type=Path, required=True, help="results folder: im512/ and im256/ are written inside")
    p.add_argument("--num", type=int, default=None, help="only the first N prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=SAMPLERS, default=None, help="default: the model's (PNDM for SD)")
    p.add_argument("--size", type=int, default=512, help="generated size (the protocol's 512)")
    p.add_argument("--eval-size", type=int, default=256, help="size of the copies the scores use (256)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seed-mode", choices=["per_prompt", "single"], default="per_prompt",
                   help="per_prompt: prompt i uses seed+i, so images do not depend on batch size or GPU count; "
                        "single: one generator for the whole run, as BK-SDM's script (use --batch-size 1, no resume)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else args.device
    try:
        rows = read_prompts(args.prompts)[:args.num]
        dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError, ConnectionError, CheckpointError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2

    per_rank = -(-len(rows) // world)  # ceil
    mine = list(range(rank * per_rank, min(len(rows), (rank + 1) * per_rank)))
    todo = [i for i in mine if not ((args.out / "im512" / rows[i][0]).is_file()
                                    and (args.out / "im256" / rows[i][0]).is_file())]
    generator = torch.Generator("cpu").manual_seed(args.seed) if args.seed_mode == "single" else None
    bar = tqdm(total=len(todo), disable=rank != 0, desc="generating", unit="img")
    start = time.time()
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b:b + args.batch_size]
        # per_prompt seeds need consecutive prompts in a batch: otherwise run them one by one
        groups = [batch] if generator or batch == list(range(batch[0], batch[0] + len(batch))) else [[i] for i in batch]
        for group in groups:
            images = pipe([rows[i][1] for i in group], steps=args.steps, guidance=args.guidance,
                          seed=generator or args.seed + group[0], seed_mode="per_image", height=args.size,
                          width=args.size, scheduler=args.scheduler, progress=False)
            for i, image in zip(group, images):
                for folder, picture in (("im512", image), ("im256", image.resize((args.eval_size, args.eval_size)))):
                    path = args.out / folder / rows[i][0]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(path)  # Image.resize's default filter is bicubic, as the protocol's
        bar.update(len(batch))
        bar.set_postfix(img_per_s=f"{(b + len(batch)) / (time.time() - start):.2f}")
    bar.close()
    print(f"rank {rank}: {len(mine)} images in {args.out / 'im256'} ({len(todo)} generated now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
