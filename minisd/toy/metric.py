"""The toy world's metric: no downloaded network, only the pixel checker (minisd/toy/checker.py).

For generated images of held-out captions it reports
- per-attribute accuracy: the share of images whose stated colours, shapes, sizes, count, position or relation
  the checker finds (position and relation over the captions that state them);
- caption accuracy: the share of images with all of them right, the toy world's text-image alignment score;
- a toy FID: the Frechet distance (pytorch-fid's formula, minisd/metrics/fid.py) between the checker's
  features (checker.features(): per colour the blob's area, place, extent and shape matches; the background
  tone; stray pixels) of the generated images and of the real held-out images of the same captions. Like FID,
  it compares distributions: it sees shapes drawn too big, smeared or doubled even where the caption check
  passes.

    from minisd.toy.metric import evaluate_folder
    scores = evaluate_folder("results/toy-sd/im256", rows, real_dir="data/toy/heldout")
"""

import os
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from minisd.metrics.fid import feature_stats, frechet_distance
from minisd.toy.checker import check_folder, features
from minisd.toy.parallel import ordered_map

ATTRIBUTES = ("colour", "shape", "size", "count", "position", "relation")


def file_features(folder: Path, file_name: str) -> np.ndarray:
    with Image.open(folder / file_name) as image:
        return features(image)


def folder_features(folder: str | Path, names: list[str], workers: int = 1) -> np.ndarray:
    """checker.features() of each named image of `folder`: [N, 58] float32."""
    folder = Path(folder)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} images are not in {folder} (first: "
                                f"{missing[0]}); "
                                "the real folder must hold the held-out images the prompts came from")
    return np.stack(list(ordered_map(partial(file_features, folder), names, workers)))


def toy_fid(generated: np.ndarray, real: np.ndarray) -> float:
    """The Frechet distance between two sets of checker features."""
    return frechet_distance(*feature_stats(generated), *feature_stats(real))


def evaluate_folder(images_dir: str | Path, rows: list[tuple[str, str]], real_dir: str | Path | None = None,
                    workers: int | None = None) -> dict:
    """Scores of the generated images `images_dir/file_name` for the (file_name, caption) rows:
    `caption_accuracy`, `accuracy` per attribute, `judged` (images per attribute), `images`, and with
    `real_dir` (the folder of the real images under the same file names, e.g. data/toy/heldout) `toy_fid`.
    Images of any size are scaled to 64 px."""
    if not rows:
        raise ValueError("evaluate_folder needs at least one (file_name, caption) row")
    workers = workers or len(os.sched_getaffinity(0))
    totals = check_folder(images_dir, rows, workers)
    right, judged = totals["caption_correct"]
    scores = {"images": judged, "caption_accuracy": right / judged,
              "accuracy": {name: totals[name][0] / totals[name][1] for name in ATTRIBUTES
                           if totals.get(name, (0, 0))[1]},
              "judged": {name: totals[name][1] for name in ATTRIBUTES if name in totals}}
    if real_dir is not None:
        if len(rows) < 2:
            raise ValueError("the toy FID needs at least 2 images (a covariance); give more prompts")
        names = [name for name, _ in rows]
        scores["toy_fid"] = toy_fid(folder_features(images_dir, names, workers),
                                    folder_features(real_dir, names, workers))
    return scores
