"""Random-weight models for the benchmarks: minisd pipelines at the real SD/BK-SDM configs, or at
an eighth of the width for smoke runs. Their diffusers/transformers twins are in reference.py.

No checkpoint is needed: speed and memory do not depend on what the weights are.
"""

import dataclasses

import torch

from minisd.checkpoints.ldm import SD_SCHEDULER  # SD's scheduler_config.json (PNDM, scaled-linear betas)
from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_H14, CLIPTextEncoder
from minisd.pipeline import Pipeline
from minisd.table import LCM_GUIDANCE_EMBED_DIM, TEACHERS, UNetTable, variant
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import SD_VAE, AutoencoderKL, VAEConfig
from minisd.vae_tiny import TAESD, AutoencoderTiny

PADS = {"v1": "<|endoftext|>", "v2": "!"}  # SD-v1 pads with <|endoftext|>, SD-v2 (OpenCLIP) with "!"
# 2 levels: latents at 1/2 size
REDUCED_VAE = VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8)


def reduced(table: UNetTable) -> UNetTable:
    """The same table at an eighth of the width (8 GroupNorm groups): the smoke-run U-Net."""
    stages = tuple(dataclasses.replace(s, channels=s.channels // 8) for s in table.stages)
    return dataclasses.replace(table, stages=stages, groups=8, context_dim=table.context_dim // 8)


def random_pipeline(family: str = "v1", name: str = "sd", small: bool = False, device="cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, lcm: bool = False,
                    tiny_vae: bool = False) -> Pipeline:
    """A pipeline with random weights: the `family` teacher's table cut to variant `name` (sd, base,
    small, tiny), the family's text encoder and SD's VAE; small=True: all at reduced size. lcm=True: the U-Net
    has LCM's guidance embedding (a fully distilled LCM: no CFG pass); tiny_vae=True: TAESD (TAESD's own
    size even with small=True: it is small already) instead of SD's VAE."""
    torch.manual_seed(seed)
    table = variant(TEACHERS[family], name)
    text = CLIP_VIT_L14 if family == "v1" else OPENCLIP_VIT_H14
    vae = SD_VAE
    if small:
        table = reduced(table)
        text = dataclasses.replace(text, width=table.context_dim, layers=2, heads=4,
                                   mlp_width=4 * table.context_dim)
        vae = REDUCED_VAE
    if lcm:
        table = dataclasses.replace(table, guidance_embed_dim=LCM_GUIDANCE_EMBED_DIM)
    with torch.device(device):
        parts = dict(unet=UNet(table), text_encoder=CLIPTextEncoder(text),
                     vae=AutoencoderTiny(TAESD) if tiny_vae else AutoencoderKL(vae))
    pipe = Pipeline(tokenizer=CLIPTokenizer.builtin(PADS[family]), scheduler_config=dict(SD_SCHEDULER),
                    source=f"random {table.name}{' (reduced)' if small else ''}", **parts)
    for model in parts.values():
        model.to(dtype=dtype).eval().requires_grad_(False)
    return pipe
