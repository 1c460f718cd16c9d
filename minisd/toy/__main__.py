"""The toy world's command line: write a data set, or score images against their captions.

    python -m minisd.toy data --out data/toy --n 20000 --seed 0 --heldout 0.1
    python -m minisd.toy check --images data/toy/heldout
    python -m minisd.toy check --images results/toy/im512 --metadata data/toy/heldout/metadata.csv

`check` prints the share of images whose stated colours, shapes, sizes, count and position or relation the pixel
checker finds, and the share with all of them (caption accuracy). Images of any size are scaled to 64 px first.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from minisd.toy.checker import check_folder
from minisd.toy.dataset import write_dataset


def read_rows(path: Path) -> list[tuple[str, str]]:
    """(file_name, text) rows of a metadata.csv with a `file_name,text` header."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"file_name", "text"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path} has columns {reader.fieldnames}; expected a header with file_name,text")
        return [(row["file_name"], row["text"]) for row in reader]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minisd.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write train/ and heldout/ splits of toy images")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--n", type=int, default=20000, help="images in all, both splits")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--heldout", type=float, default=0.1, help="share of images in heldout/ (0 for none)")
    check = commands.add_parser("check", help="score images against their captions")
    check.add_argument("--images", type=Path, required=True)
    check.add_argument("--metadata", type=Path, help="file_name,text CSV (default: IMAGES/metadata.csv)")
    for command in (data, check):
        command.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command == "data":
        if not 0 <= args.heldout < 1 or args.n < 1:
            sys.exit("need --n >= 1 and 0 <= --heldout < 1")
        info = write_dataset(args.out, args.n, args.seed, args.heldout, args.workers)
        print(f"wrote {info['counts']} to {args.out} in {time.perf_counter() - start:.1f} s; "
              f"held-out pairs {info['heldout_pairs']}")
        return
    totals = check_folder(args.images, read_rows(args.metadata or args.images / "metadata.csv"), args.workers)
    for name in ("colour", "shape", "size", "count", "position", "relation", "caption_correct"):
        right, judged = totals.get(name, (0, 0))
        if judged:
            print(f"{name:16s} {right / judged:7.2%}  ({right}/{judged})")
    print(f"checked {totals['caption_correct'][1]} images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
