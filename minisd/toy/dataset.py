"""Writes the toy world as training data, in the layout minisd.data reads: a folder of PNGs with metadata.csv
(`file_name,text`), plus scenes.jsonl (each image's caption and scene, the checker's ground truth).

    OUT/train/    000000.png ... metadata.csv scenes.jsonl
    OUT/heldout/  000000.png ... metadata.csv scenes.jsonl
    OUT/info.json the seed, the counts and the held-out colour+shape pairs

The held-out split tests composition: a few colour+shape pairs (3 of the 30 for --heldout 0.1) never appear in
training, and every held-out scene shows at least one of them. The pairs take distinct colours and distinct
shapes, so training still shows every colour and every shape, just never in those combinations. Example i of a
split is a pure function of (seed, split, i): any number of worker processes writes the same bytes.

Train with random flips off (train.py --no-flip): a mirrored image contradicts its "left"/"right" caption.
"""

import csv
import json
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from minisd.toy.captions import caption
from minisd.toy.parallel import ordered_map
from minisd.toy.world import PAIRS, PALETTE, SHAPES, Scene, render, sample_scene

SPLITS = ("train", "heldout")  # a split's index is part of each example's seed


def heldout_pairs(seed: int, fraction: float) -> frozenset:
    """round(fraction * 30) colour+shape pairs (at least 1 when fraction > 0, at most 5), with distinct
    colours and distinct shapes, drawn with the seed."""
    count = min(len(SHAPES), max(1, round(fraction * len(PAIRS)))) if fraction > 0 else 0
    rng = np.random.default_rng((seed, len(SPLITS)))  # a key no split uses
    colours, shapes = rng.permutation(list(PALETTE))[:count], rng.permutation(list(SHAPES))[:count]
    return frozenset((str(c), str(s)) for c, s in zip(colours, shapes))


def example(seed: int, split: str, index: int, held_out: frozenset) -> tuple[Scene, str]:
    """Example `index` of a split, and its caption: training scenes avoid the held-out pairs, held-out scenes
    show one of them."""
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    scene = sample_scene(rng, avoid=held_out) if split == "train" else sample_scene(rng, need=held_out)
    return scene, caption(scene, rng)


def write_example(folder: Path, seed: int, split: str, held_out: frozenset, index: int) -> str:
    """Renders and saves one example; returns its scenes.jsonl line."""
    scene, text = example(seed, split, index, held_out)
    file_name = f"{index:06d}.png"
    render(scene).save(folder / file_name)
    return json.dumps({"file_name": file_name, "text": text, **asdict(scene)})


def write_split(folder: Path, split: str, n: int, seed: int, held_out: frozenset, workers: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    work = partial(write_example, folder, seed, split, held_out)
    # in index order, whichever worker wrote it
    lines = list(ordered_map(work, range(n), workers, chunksize=256))
    with open(folder / "scenes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows((record["file_name"], record["text"]) for record in map(json.loads, lines))


def write_dataset(out: str | Path, n: int, seed: int = 0, heldout: float = 0.1,
                  workers: int | None = None) -> dict:
    """n examples under `out`: round(n * heldout) in heldout/, the rest in train/. Returns what info.json
    holds."""
    out, workers = Path(out), workers or len(os.sched_getaffinity(0))
    held_out = heldout_pairs(seed, heldout)
    counts = {"train": n - round(n * heldout), "heldout": round(n * heldout)}
    for split, count in counts.items():
        if count:
            write_split(out / split, split, count, seed, held_out, workers)
    info = {"seed": seed, "counts": counts, "heldout_pairs": sorted(" ".join(pair) for pair in held_out)}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
