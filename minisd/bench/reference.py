"""The reference side of the benchmarks: diffusers/transformers twins of minisd's models, holding
the same weights. This is the one module of minisd that imports diffusers and transformers, which
are test requirements (pip install -r requirements-test.txt), not runtime ones; `python -m
minisd.bench` imports it only when a benchmark runs the reference side.

The twins are built from minisd's weights through the same key tables that save and load
checkpoints (minisd/checkpoints/diffusers.py), so both libraries compute the same function.
"""

import tempfile

import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import AutoencoderTiny as DiffusersTinyVAE
from diffusers import DDPMScheduler  # noqa: F401  (the reference KD step's noise schedule, bench/kd_steps.py)
from diffusers import LCMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFTokenizer

from minisd.checkpoints.diffusers import TEXT_RULES, VAE_RULES, unet_config_from_table, unet_rules
from minisd.checkpoints.remap import export
from minisd.checkpoints.taesd import tiny_vae_rules
from minisd.pipeline import Pipeline
from minisd.unet import UNet
from minisd.vae_tiny import AutoencoderTiny


def _quiet() -> None:
    """diffusers notes each cast of a model it did not load from files itself; these are random models."""
    logging.set_verbosity_error()


def _on_device_of(like: torch.nn.Module) -> torch.device:
    """The device to build a twin on, as a context: its random init is quick on a GPU, and slow on a CPU
    (seconds per model on the GPU machine's CPU, for weights that are overwritten at once)."""
    return torch.device(next(like.parameters()).device)


def _loaded(model: torch.nn.Module, state_dict: dict, like: torch.nn.Module) -> torch.nn.Module:
    p = next(like.parameters())
    model.load_state_dict(state_dict, strict=True)
    return model.to(p.device, p.dtype).eval().requires_grad_(False)


def diffusers_unet(unet: UNet):
    """diffusers' UNet2DConditionModel with the weights of a minisd U-Net."""
    _quiet()
    config = {k: v for k, v in unet_config_from_table(unet.config).items() if not k.startswith("_")}
    with _on_device_of(unet):
        model = UNet2DConditionModel(**config)
    return _loaded(model, export(unet, unet_rules(unet.config)), unet)


def diffusers_pipeline(pipe: Pipeline, scheduler: str = "pndm"):
    """diffusers' StableDiffusionPipeline holding the weights of a minisd pipeline (no safety checker), with
    PNDMScheduler or (scheduler "lcm") LCMScheduler. For an LCM U-Net it decides as the LCM pipeline does:
    the guidance embedding, no CFG pass."""
    _quiet()
    vae_config = {k: v for k, v in pipe.vae.config.to_diffusers().items() if not k.startswith("_")}
    if isinstance(pipe.vae, AutoencoderTiny):
        vae_class, vae_rules = DiffusersTinyVAE, tiny_vae_rules(pipe.vae.config)
    else:
        vae_class, vae_rules = DiffusersVAE, VAE_RULES
    with _on_device_of(pipe.vae):
        vae = _loaded(vae_class(**vae_config), export(pipe.vae, vae_rules), pipe.vae)
    scheduler_class = LCMScheduler if scheduler == "lcm" else PNDMScheduler
    text_config = {k: v for k, v in pipe.text_encoder.config.to_transformers().items()
                   if k not in ("architectures", "model_type")}
    with _on_device_of(pipe.text_encoder):
        text_model = CLIPTextModel(CLIPTextConfig(**text_config))
    weights = export(pipe.text_encoder, TEXT_RULES)
    if not any(k.startswith("text_model.") for k in text_model.state_dict()):  # transformers >= 5: no prefix
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    text_encoder = _loaded(text_model, weights, pipe.text_encoder)
    with tempfile.TemporaryDirectory() as folder:  # transformers reads a tokenizer from its files only
        pipe.tokenizer.save(folder)
        tokenizer = HFTokenizer.from_pretrained(folder)
    ref = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  unet=diffusers_unet(pipe.unet),
                                  scheduler=scheduler_class.from_config(pipe.scheduler_config),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref
