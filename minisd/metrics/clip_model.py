"""CLIP, both towers: the model the CLIP score embeds images and prompts with.

CLIP (Radford et al., 2021, arXiv 2103.00020, sec. 2.3-2.4) projects an image encoder's and a text
encoder's outputs into one embedding space, where matching pairs have a high cosine. This follows
open_clip's CLIP (open_clip/model.py): the image tower is minisd/clip_vision.py's ViT; the text
tower is SD's text transformer (minisd/clip.py), read at the end-of-text token, which has the
largest id (open_clip's "argmax" pooling), and projected by `text_projection`.

Presets are open_clip's model_configs/*.json; BK-SDM scores with ViT-g-14 (docs/bksdm.md), the DreamBooth
protocol with OpenAI's ViT-B/32 (docs/evaluation.md).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from minisd import clip_vision as vit
from minisd.clip import OPENCLIP_VIT_H14, CLIPTextConfig, CLIPTextEncoder
from minisd.clip_vision import OPENAI_MEAN, OPENAI_STD, VisionConfig, VisionTransformer, preprocess
from minisd.metrics.clip_tokenizer import open_clip_tokenizer


@dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig
    text: CLIPTextConfig
    # The normalisation the weights were trained with (open_clip's pretrained config; OpenAI's for most)
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self):
        if self.text.eos_token_id != 2:  # the legacy id that makes CLIPTextEncoder.pooled take the argmax
            raise ValueError("the text tower must pool at the largest token id (open_clip's argmax): "
                             "eos_token_id 2")

    @property
    def embed_dim(self) -> int:
        return self.vision.embed_dim


def _text(width: int, heads: int, layers: int) -> CLIPTextConfig:
    return dataclasses.replace(OPENCLIP_VIT_H14, width=width, heads=heads, layers=layers, mlp_width=4 * width)


# Parameters, both towers and logit_scale; the same counts as open_clip's CLIP of the same name.
PRESETS = {
    "ViT-B-32": CLIPConfig(vit.VIT_B32, _text(512, 8, 12)),          # 151.3M
    # 151.3M; OpenAI's own CLIP ViT-B/32 (quick-GELU in both towers): DreamBooth's CLIP-I and CLIP-T
    "ViT-B-32-quickgelu": CLIPConfig(dataclasses.replace(vit.VIT_B32, activation="quick_gelu"),
                                     dataclasses.replace(_text(512, 8, 12), activation="quick_gelu")),
    "ViT-L-14": CLIPConfig(vit.VIT_L14, _text(768, 12, 12)),         # 427.6M
    # 986.1M; SD-v2's text encoder is its first 23 blocks
    "ViT-H-14": CLIPConfig(vit.VIT_H14, _text(1024, 16, 24)),
    "ViT-g-14": CLIPConfig(vit.VIT_G14, _text(1024, 16, 24)),        # 1,366.7M; BK-SDM's CLIP score
    "ViT-bigG-14": CLIPConfig(vit.VIT_BIGG14, _text(1280, 20, 32)),  # 2,539.6M
}


class CLIPModel(nn.Module):
    """encode_image: images [B, 3, S, S] -> [B, embed_dim]; encode_text: ids [B, 77] -> [B, embed_dim].

    Neither is L2-normalised (as open_clip's encode_* with normalize=False).
    """

    def __init__(self, config: CLIPConfig = PRESETS["ViT-g-14"]):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.text = CLIPTextEncoder(config.text)
        width = config.text.width
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, config.embed_dim))
        # CLIP's learned softmax temperature, log(1/0.07) at the start of training; the CLIP score
        # is a raw cosine and does not use it, but it belongs to the checkpoint.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.pooled(ids, self.text(ids)) @ self.text_projection

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S], as open_clip's eval transform for these weights."""
        size = self.config.vision.image_size
        return torch.stack([preprocess(im, size, self.config.image_mean,
                                       self.config.image_std) for im in images])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ids [B, 77], as open_clip's tokenizer for these weights."""
        return open_clip_tokenizer(self.config.text.max_positions)(prompts)
