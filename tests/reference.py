"""Helpers shared by the parity tests: random reference weights, hub-layout folders, comparison."""

import gzip
import importlib.util
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every 1-d parameter (norm weights and biases, all biases) away from its initial value.

    Freshly initialised norms are exactly 1 and biases often exactly 0: a loader that dropped them
    would still match. After this, every tensor carries information.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, relative to the output's scale (max |a|, at least 1)."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1.0)).item()


def hub_folder(folder: Path, pad: str) -> Path:
    """A tokenizer/ folder as the SD hub repos have it, from open-clip's merge list."""
    path = (Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
            / "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:48895]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "")
                                                    for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = {"content": "<|startoftext|>", **token}, {"content": "<|endoftext|>", **token}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": eos}))
    added = {"__type": "AddedToken"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": {**added, **bos}, "do_lower_case": True,
        "eos_token": {**added, **eos}, "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": {**added, **eos}}))
    return folder


# The real configs, as the hub repos ship them (CompVis/stable-diffusion-v1-4 unet/config.json).
SD_V1_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1)
# stabilityai/stable-diffusion-2-1-base
SD_V2_CONFIG = dict(SD_V1_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                    use_linear_projection=True)
# nota-ai/bk-sdm-{base,small,tiny} and bk-sdm-v2-*: the teacher's config with these changes
BK_CHANGES = {
    "sd": {},
    "base": dict(layers_per_block=1),
    "small": dict(layers_per_block=1, mid_block_type=None),
    "tiny": dict(layers_per_block=1, mid_block_type=None, block_out_channels=[320, 640, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3),
}
def real_config(family: str, name: str) -> dict:
    cfg = dict(SD_V1_CONFIG if family == "v1" else SD_V2_CONFIG, **BK_CHANGES[name])
    if name == "tiny" and family == "v2":
        cfg["attention_head_dim"] = [5, 10, 20]
    return cfg


def reduced_config(family: str, name: str) -> dict:
    """The same architecture at an eighth of the width, for fast tests."""
    cfg = real_config(family, name)
    cfg["block_out_channels"] = [c // 8 for c in cfg["block_out_channels"]]  # 40/80/160/160
    cfg.update(norm_num_groups=8, cross_attention_dim=cfg["cross_attention_dim"] // 8)
    return cfg


PADS = {"v1": "<|endoftext|>", "v2": "!"}
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
VAE_FULL = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                sample_size=512)
VAE_SMALL = dict(VAE_FULL, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)


def text_config(family: str, width: int, layers: int, heads: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1,
                          hidden_act="quick_gelu" if family == "v1" else "gelu")


def reference_parts(family: str, unet_cfg: dict, text_cfg: CLIPTextConfig, vae_cfg: dict,
                    seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return dict(unet=perturb_(UNet2DConditionModel(**unet_cfg)).eval(),
                vae=perturb_(AutoencoderKL(**vae_cfg)).eval(),
                text_encoder=perturb_(CLIPTextModel(text_cfg)).eval())


def save_hub_layout(parts: dict, family: str, folder, prediction_type="epsilon"):
    """Save as the hub repos are: `text_model.` keys (transformers 5 drops them) and vocab.json/merges.txt."""
    tokenizer = CLIPTokenizer.from_pretrained(hub_folder(folder / "tok", PADS[family]))
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   scheduler=PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type),
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    weights = folder / "pipe" / "text_encoder" / "model.safetensors"
    save_file({k if k.startswith("text_model.") else "text_model." + k: v
               for k, v in load_file(weights).items()},
              weights)
    for f in (folder / "pipe" / "tokenizer").iterdir():
        f.unlink()
    (folder / "pipe" / "tokenizer").rmdir()
    hub_folder(folder / "pipe" / "tokenizer", PADS[family])
    return pipe, folder / "pipe"
