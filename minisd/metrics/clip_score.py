"""CLIP score: how well images match their prompts, as BK-SDM reports it.

BK-SDM's src/eval_clip_score.py (after open_clip's usage example): each image goes through open_clip's
eval transform and its prompt through open_clip's tokenizer; both are embedded by ViT-g-14
(laion2b_s34b_b88k), L2-normalised, and the score of the pair is their dot product, a raw cosine
(not scaled by 100, not clipped at 0, unlike Hessel et al.'s CLIPScore). The reported number is the
mean over the set; SD-v1.4 scores 0.2958 on BK-SDM's 30K MS-COCO prompts at 256 px.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from minisd.metrics.open_clip_weights import load_clip
from minisd.metrics.clip_model import CLIPModel


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| in float32, as BK-SDM's script divides (no epsilon: an all-zero embedding would be an error
    upstream)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def image_embeddings(model, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised embeddings [B, D] (float32, on the model's device) of PIL images, by any model with
    `preprocess` and `encode_image`: CLIPModel, or DINO (minisd/metrics/dino.py)."""
    param = next(model.parameters())
    return unit(model.encode_image(model.preprocess(images).to(param.device, param.dtype)))


@torch.no_grad()
def text_embeddings(model: CLIPModel, prompts: list[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings [B, D] (float32, on the model's device)."""
    return unit(model.encode_text(model.tokenize(prompts).to(next(model.parameters()).device)))


def pair_scores(model: CLIPModel, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """The cosine of each image with its prompt [B] (float32, on the model's device)."""
    return (image_embeddings(model, images) * text_embeddings(model, prompts)).sum(dim=-1)


def _check_pairs(n_images: int, n_prompts: int) -> None:
    if n_images != n_prompts:
        raise ValueError(f"{n_images} images but {n_prompts} prompts: the CLIP score needs one prompt per "
                         "image")
    if n_images == 0:
        raise ValueError("no images to score")


def clip_score(model: CLIPModel, images: list[Image.Image], prompts: list[str], batch_size: int = 32,
               device: str | torch.device | None = None) -> tuple[float, np.ndarray]:
    """(mean score, per-image scores [N] as float64) of images against their prompts.

    device: where to run (the model is moved there); by default where the model is.
    """
    _check_pairs(len(images), len(prompts))
    if device is not None:
        model.to(device)
    scores = [pair_scores(model, images[i:i + batch_size], prompts[i:i + batch_size]).cpu()
              for i in range(0, len(images), batch_size)]
    per_image = torch.cat(scores).double().numpy()
    return float(per_image.mean()), per_image


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # read the pixels now, so the file can be closed
            return image
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); regenerate it or remove its "
                         "row") from None


def folder_clip_score(folder: str | Path, rows: list[tuple[str, str]], model: CLIPModel | None = None,
                      batch_size: int = 32, device: str | torch.device | None = None,
                      progress: bool = True) -> tuple[float, np.ndarray]:
    """The CLIP score of the images in `folder`, one per (file_name, text) row of a metadata.csv.

    model: by default BK-SDM's ViT-g-14 (laion2b_s34b_b88k), loaded with load_clip on `device`.
    Every file is checked before any is scored; images are read one batch at a time.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not rows:
        raise ValueError("no rows to score")
    missing = [name for name, _ in rows if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(rows)} images are missing from {folder}, e.g. "
                                f"{', '.join(missing[:5])}; generate them first (evaluate.py) or score fewer "
                                "rows")
    if model is None:
        model = load_clip(device=device or "cpu")
    elif device is not None:
        model.to(device)
    scores = []
    with tqdm(total=len(rows), desc="CLIP score", unit="img", disable=not progress) as bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            scores.append(pair_scores(model, [_open(folder / name) for name, _ in batch],
                                      [text for _, text in batch]).cpu())
            bar.update(len(batch))
    per_image = torch.cat(scores).double().numpy()
    return float(per_image.mean()), per_image
