"""CLIP's image tower: a Vision Transformer, and the image preprocessing CLIP expects.

CLIP (Radford et al., 2021, arXiv 2103.00020, sec. 2.4) encodes an image with a ViT (Dosovitskiy
et al., 2021): the image is cut into patches, each patch is projected to a token, a learned class
token is put in front, learned position embeddings are added, and a LayerNorm ("ln_pre", CLIP's
addition) precedes pre-LayerNorm transformer blocks. The class token's output, LayerNormed again
and projected, is the image embedding. This follows open_clip's VisionTransformer
(open_clip/transformer.py) with its defaults: class-token pooling, exact GELU unless the model was
trained with OpenAI's quick-GELU, and attention as torch's fused nn.MultiheadAttention computes it.

The plain ViT that DINO trains (Caron et al., 2021, arXiv 2104.14294; minisd/metrics/dino.py) is the
same network with three config fields set otherwise: a bias in the patch projection, no ln_pre, and
no projection (its embedding is the class token after the final LayerNorm).

`preprocess` reproduces open_clip's evaluation transform (open_clip/transform.py, image_transform
with is_train=False) on PIL and numpy alone: the torchvision steps Resize (shortest side),
CenterCrop, ToTensor and Normalize, with torchvision's own rounding. With `resize` larger than the
crop it is also DINO's and ImageNet's evaluation transform (Resize(256), CenterCrop(224)).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minisd.clip import ACTIVATIONS, CLIPLayer

# Normalisation of OpenAI's CLIP training (open_clip/constants.py, OPENAI_DATASET_MEAN/STD), which
# most open_clip checkpoints keep, LAION's ViT-g-14 included.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    embed_dim: int | None = 768   # the joint image-text embedding the tower projects to; None: no projection
    activation: str = "gelu"      # "quick_gelu" for OpenAI-trained weights
    layer_norm_eps: float = 1e-5
    patch_bias: bool = False      # a bias in the patch projection: the plain ViT's (DINO's); CLIP has none
    norm_pre: bool = True         # CLIP's LayerNorm before the blocks (ln_pre); the plain ViT has none

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size "
                             f"{self.patch_size}")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token


# open_clip's model_configs/*.json; heads = width / head_width, mlp_width = int(width * mlp_ratio)
VIT_B32 = VisionConfig(patch_size=32, width=768, layers=12, heads=12, mlp_width=3072, embed_dim=512)  # 87.8M
VIT_L14 = VisionConfig()                                                                            # 304.0M
VIT_H14 = VisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, embed_dim=1024)             # 632.1M
VIT_G14 = VisionConfig(width=1408, layers=40, heads=16, mlp_width=6144, embed_dim=1024)             # 1,012.6M
VIT_BIGG14 = VisionConfig(width=1664, layers=48, heads=16, mlp_width=8192, embed_dim=1280)          # 1,844.9M


class VisionTransformer(nn.Module):
    """Normalised images [B, 3, S, S] (see `preprocess`) -> image embeddings [B, embed_dim] (or [B, width]
    without a projection), not L2-normalised."""

    def __init__(self, config: VisionConfig = VIT_L14):
        super().__init__()
        self.config = config
        scale = config.width ** -0.5  # open_clip's initial scale of the embeddings and the projection
        self.patch_embed = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.class_embedding = nn.Parameter(scale * torch.randn(config.width))
        self.position_embedding = nn.Parameter(scale * torch.randn(config.tokens, config.width))
        self.norm_pre = (nn.LayerNorm(config.width, eps=config.layer_norm_eps) if config.norm_pre
                         else nn.Identity())
        # the text tower's layer (minisd/clip.py) without its causal mask: every patch sees every other
        self.layers = nn.ModuleList(
            CLIPLayer(config.width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps,
                      causal=False) for _ in range(config.layers))
        self.norm_post = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        # used as x @ projection
        self.projection = (nn.Parameter(scale * torch.randn(config.width, config.embed_dim))
                           if config.embed_dim is not None else None)

    def forward(self, images: torch.Tensor, interpolate_positions: bool = False) -> torch.Tensor:
        """interpolate_positions: take images of another size than the config's, with the position
        embeddings resized to their grid (`positions`); else such images are refused."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size) and not interpolate_positions:
            raise ValueError(f"images must be {size}x{size} (see preprocess), got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images)       # [B, width, grid_h, grid_w]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)   # -> [B, grid_h*grid_w, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(*grid).to(x.dtype)
        x = self.norm_pre(x)
        for layer in self.layers:
            x = layer(x)
        # open_clip LayerNorms every token, then keeps the class token; a LayerNorm acts per token.
        x = self.norm_post(x[:, 0])
        return x if self.projection is None else x @ self.projection

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embeddings [1 + grid_h*grid_w, width] of a grid_h x grid_w patch grid: the learned
        ones, or for another grid the patch part resized bicubically (align_corners=False) to it, as
        transformers' ViTEmbeddings.interpolate_pos_encoding does. (The original DINO code resizes by a
        scale factor, nudged by 0.1, which samples slightly different points.)"""
        n = self.config.image_size // self.config.patch_size
        if (grid_h, grid_w) == (n, n):
            return self.position_embedding
        cls, patches = self.position_embedding[:1], self.position_embedding[1:]
        patches = patches.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # -> [1, width, n, n]
        patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        # -> [1 + grid_h*grid_w, width]
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])


def preprocess(image: Image.Image, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD,
               resize: int | None = None) -> torch.Tensor:
    """A PIL image -> the normalised tensor [3, size, size] that open_clip's eval transform gives.

    resize: the short side before the center crop (default: `size`); DINO's evaluation uses 256 for 224.
    """
    # Resize(resize): the short side becomes `resize`, the long side int(resize * long / short), floored
    # (torchvision's _compute_resized_output_size); PIL's bicubic, which antialiases when shrinking.
    resize = resize or size
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_w, new_h = (resize, int(resize * long / short)) if w <= h else (int(resize * long / short), resize)
    if (new_w, new_h) != (w, h):  # torchvision returns the image untouched when it has the size
        image = image.resize((new_w, new_h), Image.BICUBIC)
    # CenterCrop(size): torchvision's offsets use Python's round(), which rounds halves to even.
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    # Only then to RGB (open_clip's MaybeConvertMode), and ToTensor: [H, W, 3] uint8 -> [3, H, W] in [0, 1].
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return x.sub(mean).div(std)
