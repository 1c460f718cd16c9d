"""DINO's ViT-S/16: the image embedding of DreamBooth's subject-fidelity score.

DINO (Caron et al., 2021, arXiv 2104.14294) trains a plain Vision Transformer (Dosovitskiy et al., 2021) by
self-distillation, without labels; its class token separates images of one object from images of others of the
same class better than CLIP does, which is why DreamBooth (Ruiz et al., 2023, arXiv 2208.12242, sec. 4.1)
measures subject fidelity with it. The network is minisd/clip_vision.py's VisionTransformer with three of its
config fields set the plain ViT's way: the patch projection has a bias, no LayerNorm precedes the blocks, and
there is no projection: the embedding is the class token after the final LayerNorm, as the original code's
forward returns (facebookresearch/dino, vision_transformer.py) and transformers' ViTModel's
last_hidden_state[:, 0]. The blocks are CLIP's (pre-LayerNorm, exact GELU, 64-wide heads).

The preprocessing is DINO's evaluation transform (eval_linear.py): the short side resized to 256 (bicubic), a
224 center crop, ImageNet's mean and std.
"""

import torch
from PIL import Image

from minisd.clip_vision import VisionConfig, VisionTransformer, preprocess
from minisd.images import to_rgb

# torchvision's ImageNet normalisation, which DINO's transforms use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256  # the short side before the 224 crop (eval_linear.py: Resize(256, interpolation=3))

# dino_vits16 (vision_transformer.py, vit_small): 6 heads of 64, mlp_ratio 4, LayerNorm eps 1e-6; 21.7M
# parameters. transformers' facebook/dino-vits16 config.json leaves the eps at ViTConfig's default, 1e-12:
# each loader takes the eps of its reference (minisd/metrics/dino_weights.py).
DINO_VITS16 = VisionConfig(image_size=224, patch_size=16, width=384, layers=12, heads=6, mlp_width=1536,
                           embed_dim=None, activation="gelu", layer_norm_eps=1e-6, patch_bias=True,
                           norm_pre=False)
HEAD_WIDTH = 64  # every DINO ViT (tiny, small, base) has 64-wide heads: heads = width / 64


class DINO(VisionTransformer):
    """DINO's ViT: images [B, 3, 224, 224] -> class-token features [B, width], not L2-normalised.

    encode_image and preprocess have CLIPModel's names, so the same code embeds images with either.
    """

    def __init__(self, config: VisionConfig = DINO_VITS16):
        if config.embed_dim is not None or config.norm_pre or not config.patch_bias:
            raise ValueError("a DINO ViT has a patch bias, no ln_pre and no projection (embed_dim=None)")
        super().__init__(config)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, 224, 224]: RGB first (as DINO's image loader), then the eval transform."""
        size, resize = self.config.image_size, RESIZE * self.config.image_size // 224
        return torch.stack([preprocess(to_rgb(image), size, IMAGENET_MEAN, IMAGENET_STD, resize=resize)
                            for image in images])
