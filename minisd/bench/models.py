"""Random-weight models for the benchmarks: minisd pipelines at the real SD/BK-SDM configs (or at
an eighth of the width, for smoke runs), and diffusers/transformers twins holding the same weights.

No checkpoint is needed: speed and memory do not depend on what the weights are. The twins are
built from minisd's weights through the same key tables that save and load checkpoints
(minisd/checkpoints/diffusers.py), so both libraries compute the same function.
"""

import dataclasses
import tempfile

import torch

from minisd.checkpoints.diffusers import TEXT_RULES, VAE_RULES, unet_config_from_table, unet_rules
from minisd.checkpoints.ldm import SD_SCHEDULER  # SD's scheduler_config.json (PNDM, scaled-linear betas)
from minisd.checkpoints.remap import export
from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_H14, CLIPTextEncoder
from minisd.pipeline import Pipeline
from minisd.table import TEACHERS, UNetTable, variant
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import SD_VAE, AutoencoderKL, VAEConfig

PADS = {"v1": "<|endoftext|>", "v2": "!"}  # SD-v1 pads with <|endoftext|>, SD-v2 (OpenCLIP) with "!"
REDUCED_VAE = VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8)  # 2 levels: latents at 1/2 size


def reduced(table: UNetTable) -> UNetTable:
    """The same table at an eighth of the width (8 GroupNorm groups): the smoke-run U-Net."""
    stages = tuple(dataclasses.replace(s, channels=s.channels // 8) for s in table.stages)
    return dataclasses.replace(table, stages=stages, groups=8, context_dim=table.context_dim // 8)


def random_pipeline(family: str = "v1", name: str = "sd", small: bool = False, device="cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> Pipeline:
    """A pipeline with random weights: the `family` teacher's table cut to variant `name` (sd, base,
    small, tiny), the family's text encoder and SD's VAE; small=True: all at reduced size."""
    torch.manual_seed(seed)
    table = variant(TEACHERS[family], name)
    text = CLIP_VIT_L14 if family == "v1" else OPENCLIP_VIT_H14
    vae = SD_VAE
    if small:
        table = reduced(table)
        text = dataclasses.replace(text, width=table.context_dim, layers=2, heads=4, mlp_width=4 * table.context_dim)
        vae = REDUCED_VAE
    with torch.device(device):
        parts = dict(unet=UNet(table), text_encoder=CLIPTextEncoder(text), vae=AutoencoderKL(vae))
    pipe = Pipeline(tokenizer=CLIPTokenizer.builtin(PADS[family]), scheduler_config=dict(SD_SCHEDULER),
                    source=f"random {table.name}{' (reduced)' if small else ''}", **parts)
    for model in parts.values():
        model.to(dtype=dtype).eval().requires_grad_(False)
    return pipe


def _quiet() -> None:
    """diffusers notes each cast of a model it did not load from files itself; these are random models."""
    from diffusers.utils import logging

    logging.set_verbosity_error()


def _loaded(model: torch.nn.Module, state_dict: dict, like: torch.nn.Module) -> torch.nn.Module:
    p = next(like.parameters())
    model.load_state_dict(state_dict, strict=True)
    return model.to(p.device, p.dtype).eval().requires_grad_(False)


def diffusers_unet(unet: UNet):
    """diffusers' UNet2DConditionModel with the weights of a minisd U-Net."""
    from diffusers import UNet2DConditionModel

    _quiet()
    config = {k: v for k, v in unet_config_from_table(unet.table).items() if not k.startswith("_")}
    return _loaded(UNet2DConditionModel(**config), export(unet, unet_rules(unet.table)), unet)


def diffusers_pipeline(pipe: Pipeline):
    """diffusers' StableDiffusionPipeline holding the weights of a minisd pipeline (no safety checker)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    _quiet()
    vae_config = {k: v for k, v in pipe.vae.config.to_diffusers().items() if not k.startswith("_")}
    vae = _loaded(DiffusersVAE(**vae_config), export(pipe.vae, VAE_RULES), pipe.vae)
    text_config = {k: v for k, v in pipe.text_encoder.config.to_transformers().items()
                   if k not in ("architectures", "model_type")}
    text_model = CLIPTextModel(CLIPTextConfig(**text_config))
    weights = export(pipe.text_encoder, TEXT_RULES)
    if not any(k.startswith("text_model.") for k in text_model.state_dict()):  # transformers >= 5: no prefix
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    text_encoder = _loaded(text_model, weights, pipe.text_encoder)
    with tempfile.TemporaryDirectory() as folder:  # transformers reads a tokenizer from its files only
        pipe.tokenizer.save(folder)
        tokenizer = HFTokenizer.from_pretrained(folder)
    ref = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=diffusers_unet(pipe.unet),
                                  scheduler=PNDMScheduler.from_config(pipe.scheduler_config), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref
