"""Frechet Inception Distance (Heusel et al. 2017): feature statistics, the distance, .npz stats files, folder
features.

Follows pytorch-fid (fid_score.py, after TTUR's TensorFlow original): the statistics are the mean
and the (N-1)-normalised covariance of the 2048-d pool features, and the distance is

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))

with the same handling of numerical error (an eps offset when the product is singular, and a
check that sqrtm's imaginary part is only noise). Stats files hold `mu` and `sigma`, so they are
interchangeable with pytorch-fid's `--save-stats` files and BK-SDM's `real_im256.npz`.

Folder features read images as pytorch-fid and torch-fidelity do (sorted by name, converted to RGB,
8 bits), and run them through minisd's Inception (minisd/metrics/inception.py).
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D], in float64 as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's stable version)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; were both computed with the same feature "
                         "layer?")
    diff = mu1 - mu2

    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # The product is (near) singular, e.g. fewer samples than dimensions: regularise both.
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # sqrtm of a real matrix may carry a tiny imaginary part from rounding; a large one is a real error.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrt(sigma1 sigma2)")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---- statistics files ---------------------------------------------------------------------

def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """Write `mu`, `sigma` (and optional extras, e.g. size=256) to an .npz file that pytorch-fid reads."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz (pytorch-fid recognises them by it), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append a second .npz
        np.savez_compressed(f, mu=np.asarray(mu), sigma=np.asarray(sigma),
                            **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an .npz of FID statistics (minisd's, pytorch-fid's or BK-SDM's real_im256.npz) -> (mu, sigma,
    extras)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path}. Build it from a folder of real "
                                "images with `python evaluate.py --fid-stats-from DIR --save-stats "
                                "FILE.npz`.")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"cannot read {path} as an .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {' and '.join(missing)} (it holds: {', '.join(data) or 'nothing'}); "
                         "FID statistics files hold the feature mean `mu` and covariance `sigma`.")
    mu, sigma = data.pop("mu"), data.pop("sigma")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not form a mean and covariance")
    return mu, sigma, {k: v.item() if v.ndim == 0 else v for k, v in data.items()}


# ---- features of an image folder ----------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # torch-fidelity's default set, matched in any case


class FolderFeatures(NamedTuple):
    pool: np.ndarray | None    # [N, 2048] float64, pytorch-fid input path (for FID)
    logits: np.ndarray | None  # [N, 1008] float32 unbiased logits, torch-fidelity input path (for IS)
    size: tuple[int, int]      # (height, width) shared by every image
    files: list[Path]


def image_files(folder: str | Path) -> list[Path]:
    """The PNG/JPG files of a folder (not its subfolders), sorted by name as pytorch-fid and torch-fidelity
    do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in {folder}")
    return files


def _read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return np.asarray(img.resize((size, size)) if size else img)  # [H, W, 3] uint8
    except Exception as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace "
                         "it") from None


@torch.no_grad()
def folder_features(folder: str | Path | list[Path], model, batch_size: int = 50,
                    device: torch.device | str | None = None, fid: bool = True, isc: bool = False,
                    progress: bool = True, num_workers: int = 4,
                    resize_to: int | None = None) -> FolderFeatures:
    """Inception features of every image of a folder, read once, as RGB.

    fid: pool features through pytorch-fid's input path; isc: unbiased logits through torch-fidelity's.
    With both, each batch runs through the network twice, once per path, so each metric matches its
    reference exactly. Every image must have the size of the first (FID is defined per resolution), unless
    resize_to squashes each to resize_to x resize_to first with PIL's default bicubic resize, as the MS-COCO
    protocol treats real photos. `folder` may also be a list of image files. device: where the images go
    (the model's device by default).
    """
    if not (fid or isc):
        raise ValueError("nothing to compute: ask for fid=True and/or isc=True")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    files = [Path(f) for f in folder] if isinstance(folder, (list, tuple)) else image_files(folder)
    if not files:
        raise FileNotFoundError("no images to compute features of")
    read = partial(_read_rgb, size=resize_to)
    device = device if device is not None else model.fc.weight.device
    pools, logits, size = [], [], None
    with ThreadPoolExecutor(num_workers) as readers, tqdm(total=len(files), unit="img",
                                                          disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            batch_files = files[start:start + batch_size]
            arrays = list(readers.map(read, batch_files))  # decoding overlaps across threads
            size = size or arrays[0].shape[:2]
            for path, a in zip(batch_files, arrays):
                if a.shape[:2] != size:
                    raise ValueError(f"{path} is {a.shape[0]}x{a.shape[1]} (HxW) but the first image, "
                                     f"{files[0]}, is {size[0]}x{size[1]}; resize all images to one size "
                                     "first")
            # [B, H, W, 3] -> [B, 3, H, W]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)
            if fid:
                pools.append(model(images, resize="pytorch-fid")[0].double().cpu().numpy())
            if isc:
                logits.append(model.unbiased_logits(model(images,
                                                          resize="torch-fidelity")[0]).float().cpu().numpy())
            bar.update(len(batch_files))
    return FolderFeatures(np.concatenate(pools) if fid else None, np.concatenate(logits) if isc else None,
                          tuple(int(s) for s in size), files)


def folder_stats(folder: str | Path, model, batch_size: int = 50, device: torch.device | str | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """FID statistics (mu, sigma) of a folder's images, and their (height, width)."""
    found = folder_features(folder, model, batch_size, device, fid=True, isc=False, progress=progress)
    return *feature_stats(found.pool), found.size
