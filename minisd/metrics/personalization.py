"""DreamBooth's personalization scores (Ruiz et al., 2023, arXiv 2208.12242, sec. 4.1): DINO, CLIP-I, CLIP-T.

Subject fidelity is the average pairwise cosine similarity between the embeddings of generated and real images
of the subject: with DINO ViT-S/16's class token (DINO) or with CLIP's image embedding (CLIP-I). Prompt
fidelity, CLIP-T, is the average cosine between a generated image's CLIP embedding and its prompt's. The same
pairwise similarity among the real images alone (each pair of distinct photos) is the upper bound that the
paper's table lists as "Real Images".

A subject score is any function `similarity(a, b)` of two lists of images that returns the matrix [len(a),
len(b)] of how alike each pair is; DINO and CLIP-I are `embedding_similarity` of their networks. Another
similarity (the toy world's pixel checker, where there is no DINO) plugs in the same way.
"""

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from minisd.metrics.clip_model import CLIPModel
from minisd.metrics.clip_score import image_embeddings, text_embeddings

Similarity = Callable[[list[Image.Image], list[Image.Image]], torch.Tensor]  # -> [len(a), len(b)]


def embed(model, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """L2-normalised embeddings [N, D] (float32, on the CPU), one batch at a time."""
    return torch.cat([image_embeddings(model, images[i:i + batch_size]).cpu()
                      for i in range(0, len(images), batch_size)])


def embedding_similarity(model, batch_size: int = 32) -> Similarity:
    """The cosine of each pair's embeddings by `model` (DINO, or CLIP's image tower: CLIP-I)."""
    return lambda a, b: embed(model, a, batch_size) @ embed(model, b, batch_size).T


def versus_real(similarity: torch.Tensor) -> np.ndarray:
    """Each generated image's score [n_generated]: its mean similarity with the subject's real images."""
    return similarity.double().mean(dim=1).numpy()


def real_versus_real(similarity: torch.Tensor) -> np.ndarray:
    """Each real image's score [n_real] against the subject's other real images: the row means of the
    real-vs-real matrix without its diagonal (a photo compared with itself)."""
    n = similarity.shape[0]
    if n < 2:
        raise ValueError("the real-vs-real score needs at least two real images of the subject")
    off_diagonal = similarity.double() * (1 - torch.eye(n, dtype=torch.float64))
    return (off_diagonal.sum(dim=1) / (n - 1)).numpy()


def clip_scores(model: CLIPModel, generated: list[Image.Image], prompts: list[str], real: list[Image.Image],
                batch_size: int = 32) -> dict[str, np.ndarray]:
    """CLIP-I and CLIP-T of each generated image, and CLIP-I of each real image against the others, from one
    embedding of every image: {"clip_i": [n_generated], "clip_t": [n_generated], "clip_i_real": [n_real]}."""
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} images but {len(prompts)} prompts: CLIP-T needs one per image")
    images, real_images = embed(model, generated, batch_size), embed(model, real, batch_size)
    texts = torch.cat([text_embeddings(model, prompts[i:i + batch_size]).cpu()
                       for i in range(0, len(prompts), batch_size)])
    return {"clip_i": versus_real(images @ real_images.T),
            "clip_t": (images * texts).sum(dim=-1).double().numpy(),
            "clip_i_real": real_versus_real(real_images @ real_images.T)}
