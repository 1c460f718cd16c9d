"""Analytic compute counts (multiply-accumulates) for the U-Net, VAE and text encoder.

Counted from the models' structure, not by profiling: each model is built on the meta device
and run once on meta tensors (which carry shapes but no data), and forward hooks add up
    Conv2d    k_h * k_w * (C_in / groups) * C_out * H_out * W_out * batch
    Linear    in * out * tokens  (tokens: every leading dim of the input, batch included)
    attention 2 * tokens_q * tokens_kv * dim  (QK^T scores and the weighted sum of V; dim = heads * head_dim)
Attention matmuls are counted only with attention_matmuls=True: U-Net self-attention over the
H*W latent positions, cross-attention to the 77 text tokens, the VAE's single-head mid-block
attention, and CLIP's causal attention (counted in full, as a dense kernel computes it).
Not counted: norms, activations, softmax, GEGLU gating, residual adds, up/down interpolation,
embeddings, bias adds and the sinusoidal timestep embedding; together they are well under 1%.

Convention vs. the figures quoted in docs/bksdm.md ("Compute per image", BK-SDM Kim et al.,
arXiv 2305.15798, Table 1/2): the reference counter's 338.7 GMACs for an SD-v1.4 U-Net forward
at 64x64 counts every Conv2d and Linear (attention projections and the time-embedding MLP
included) and leaves out the attention matmuls; unet_macs(..., attention_matmuls=False)
reproduces it. FLOPs are 2 x MACs. A backward pass is taken as 2 x its forward.

Few-step sampling (docs/performance.md): an LCM U-Net with guidance distilled in runs one latent per
step, no CFG pair (sampling_flops(..., guidance=False)); its guidance embedding's projection is counted.
TAESD's decoder (minisd/vae_tiny.py) is counted like the KL decoder, from its own modules.

`python -m minisd.flops --family v1 --variant small --size 512` prints the per-part table;
`--lcm --steps 4 --vae tiny` counts BK-SDM's few-step setting.
"""

import argparse
import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from minisd.blocks import Attention
from minisd.cli import positive_int
from minisd.clip import CLIP_VIT_L14, TEXT_ENCODERS, CLIPTextConfig, CLIPTextEncoder
from minisd.table import LCM_GUIDANCE_EMBED_DIM, TEACHERS, VARIANTS, UNetTable, variant
from minisd.unet import UNet, unet_part
from minisd.vae import SD_VAE, AutoencoderKL, VAEConfig
from minisd.vae_tiny import TAESD, AutoencoderTiny, TinyVAEConfig

TEXT_TOKENS = 77  # CLIP's context length: SD always encodes padded 77-token prompts


def _attention_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """2 * N_q * N_kv * dim for one attention call, read from its inputs' shapes."""
    x = args[0]
    if x.dim() == 4:  # the VAE's SpatialSelfAttention gets a feature map [B, C, H, W]
        b, c, h, w = x.shape
        return 2 * b * (h * w) ** 2 * c
    context = args[1] if len(args) > 1 else kwargs.get("context")
    n_kv = x.shape[1] if context is None else context.shape[1]
    dim = module.to_q.out_features
    return 2 * x.shape[0] * x.shape[1] * n_kv * dim


def count_macs(model: nn.Module, inputs: tuple, part_of: Callable[[str], str],
               attention_matmuls: bool = True, call: Callable | None = None) -> dict[str, int]:
    """MACs of `call(*inputs)` (default `model(*inputs)`) per part (`part_of(module name)`),
    plus `total`; only the submodules of `model` that run are counted.

    model and inputs should be on the meta device, so nothing is computed or allocated.
    """
    counts: dict[str, int] = defaultdict(int)
    handles = []

    def add(name, macs):
        counts[part_of(name)] += int(macs)

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(m, args, out, name=name):
                k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
                add(name, k * out.numel())  # out.numel() = batch * C_out * H_out * W_out
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Linear):
            def hook(m, args, out, name=name):
                add(name, m.in_features * out.numel())  # out.numel() = tokens * out_features
            handles.append(m.register_forward_hook(hook))
        elif attention_matmuls and isinstance(m, Attention):
            def hook(m, args, kwargs, name=name):
                add(name, _attention_macs(m, args, kwargs))
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            (call or model)(*inputs)
    finally:
        for h in handles:
            h.remove()
    counts = dict(counts)
    counts["total"] = sum(counts.values())
    return counts


def unet_macs(table: UNetTable, height: int, width: int, batch: int = 1,
              attention_matmuls: bool = True) -> dict[str, int]:
    """MACs of one U-Net forward on `batch` latents of height x width: `stem`, `stage s`, `mid`, `total`."""
    with torch.device("meta"):
        unet = UNet(table)
        # an LCM U-Net's guidance weight, so that its embedding's projection runs and is counted
        w = torch.zeros(batch) if table.guidance_embed_dim else None
        inputs = (torch.empty(batch, table.in_channels, height, width), torch.zeros(batch),
                  torch.empty(batch, TEXT_TOKENS, table.context_dim), None, w)
    counts = count_macs(unet, inputs, unet_part, attention_matmuls)
    parts = ["stem", *(f"stage {s}" for s in range(len(table.stages)))] + (["mid"] if table.mid else [])
    return {p: counts.get(p, 0) for p in parts} | {"total": counts["total"]}


def _vae_part(name: str) -> str:
    if "." not in name:
        return name  # quant_conv, post_quant_conv
    first, _, rest = name.partition(".")[2].partition(".")  # drop "encoder." / "decoder."
    return f"{first} {rest.split('.')[0]}" if first in ("down", "up", "levels") else first or "quant"


def _vae_macs(config: VAEConfig | TinyVAEConfig, shape: tuple[int, ...], decode: bool,
              attention_matmuls: bool) -> dict[str, int]:
    with torch.device("meta"):
        vae = AutoencoderTiny(config) if isinstance(config, TinyVAEConfig) else AutoencoderKL(config)
        x = torch.empty(shape)
    if decode:
        call = vae.decode
    else:  # TAESD's encode gives the latents; the KL encoder a posterior
        call = vae.encode if isinstance(vae, AutoencoderTiny) else (lambda x: vae.encode(x).mean)
    return count_macs(vae, (x,), _vae_part, attention_matmuls, call)


def vae_factor(config: VAEConfig | TinyVAEConfig = SD_VAE) -> int:
    """Pixels per latent along each side: 8 for SD's VAE and TAESD (every level but the last halves H, W)."""
    return config.downscale


def vae_decoder_macs(config: VAEConfig | TinyVAEConfig = SD_VAE, height: int = 512, width: int = 512,
                     batch: int = 1, attention_matmuls: bool = True) -> dict[str, int]:
    """MACs of decoding `batch` latents to height x width pixels (post_quant_conv's 1x1 included); SD's KL
    decoder or TAESD's (a TinyVAEConfig)."""
    f = vae_factor(config)
    return _vae_macs(config, (batch, config.latent_channels, height // f, width // f), True,
                     attention_matmuls)


def vae_encoder_macs(config: VAEConfig | TinyVAEConfig = SD_VAE, height: int = 512, width: int = 512,
                     batch: int = 1, attention_matmuls: bool = True) -> dict[str, int]:
    """MACs of encoding `batch` images of height x width pixels (quant_conv's 1x1 included)."""
    return _vae_macs(config, (batch, config.in_channels, height, width), False, attention_matmuls)


def text_encoder_macs(config: CLIPTextConfig = CLIP_VIT_L14, tokens: int = TEXT_TOKENS, batch: int = 1,
                      attention_matmuls: bool = True) -> dict[str, int]:
    """MACs of encoding `batch` prompts of `tokens` tokens: per `layer i` and `total`."""
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
        ids = torch.zeros(batch, tokens, dtype=torch.long)
    return count_macs(encoder, (ids,), lambda n: n.replace("layers.", "layer ").split(".")[0],
                      attention_matmuls)


def text_config_for(table: UNetTable) -> CLIPTextConfig:
    """The text encoder whose hidden states this U-Net cross-attends to (by their width)."""
    return {text.width: text for text in TEXT_ENCODERS.values()}[table.context_dim]


def sampling_flops(unet_table: UNetTable, vae_config: VAEConfig | TinyVAEConfig = SD_VAE,
                   text_config: CLIPTextConfig | None = None, size: int = 512, steps: int = 25,
                   guidance: bool = True) -> dict[str, int]:
    """FLOPs (2 x MACs) to generate one size x size image: `unet` (steps forwards, each on
    2 latents with classifier-free guidance), `vae_decode`, `text` (2 prompts with guidance), `total`.
    guidance=False: one latent and one prompt, as without CFG or with an LCM U-Net's distilled guidance."""
    text_config = text_config or text_config_for(unet_table)
    n = 2 if guidance else 1  # CFG runs the U-Net and the text encoder on (negative, positive)
    latent = size // vae_factor(vae_config)
    out = {"unet": 2 * steps * unet_macs(unet_table, latent, latent, batch=n)["total"],
           "vae_decode": 2 * vae_decoder_macs(vae_config, size, size)["total"],
           "text": 2 * text_encoder_macs(text_config, batch=n)["total"]}
    return out | {"total": sum(out.values())}


def kd_step_flops(student_table: UNetTable, teacher_table: UNetTable, size: int = 512,
                  latents_cached: bool = False, vae_config: VAEConfig = SD_VAE,
                  text_config: CLIPTextConfig | None = None) -> dict[str, int]:
    """FLOPs for one BK-SDM distillation sample (sec. 3.2): the frozen teacher's forward, the
    student's forward and backward (2 x forward), the text encoding, and the VAE encode unless
    the latents were precomputed. Parts: `teacher`, `student`, `vae_encode`, `text`, `total`."""
    text_config = text_config or text_config_for(student_table)
    latent = size // vae_factor(vae_config)
    out = {"teacher": 2 * unet_macs(teacher_table, latent, latent)["total"],
           "student": 3 * 2 * unet_macs(student_table, latent, latent)["total"],
           "vae_encode": 0 if latents_cached else 2 * vae_encoder_macs(vae_config, size, size)["total"],
           "text": 2 * text_encoder_macs(text_config)["total"]}
    return out | {"total": sum(out.values())}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Analytic MAC/FLOP counts for an SD or BK-SDM U-Net.")
    parser.add_argument("--family", choices=sorted(TEACHERS), default="v1")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sd")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="image size in pixels (default: the family's)")
    parser.add_argument("--steps", type=positive_int, default=25, help="U-Net calls per image (default 25)")
    parser.add_argument("--lcm", action="store_true",
                        help="an LCM U-Net with guidance distilled in: one latent per step, no CFG pair")
    parser.add_argument("--vae", choices=["sd", "tiny"], default="sd",
                        help="the decoder: SD's KL VAE or TAESD (minisd/vae_tiny.py)")
    args = parser.parse_args(argv)
    teacher = TEACHERS[args.family]
    table = variant(teacher, args.variant)
    if args.lcm:
        table = dataclasses.replace(table, guidance_embed_dim=LCM_GUIDANCE_EMBED_DIM)
    vae = TAESD if args.vae == "tiny" else SD_VAE
    size = args.size or teacher.sample_size * vae_factor()
    latent = size // vae_factor()
    with_attn, without = unet_macs(table, latent,
                                   latent), unet_macs(table, latent, latent, attention_matmuls=False)
    print(f"{table.name} U-Net, one forward at {latent}x{latent} latent ({size} px), GMACs")
    print(f"{'part':>8} {'conv+linear':>12} {'+attn matmuls':>14}")
    for part in with_attn:
        print(f"{part:>8} {without[part] / 1e9:>12.1f} {with_attn[part] / 1e9:>14.1f}")
    print(f"U-Net forward: {2 * with_attn['total'] / 1e12:.3f} TFLOP")
    sample = sampling_flops(table, vae, size=size, steps=args.steps, guidance=not args.lcm)
    print(f"one image, {args.steps} steps {'LCM, no CFG' if args.lcm else 'with CFG'}, "
          f"{'TAESD' if args.vae == 'tiny' else 'SD VAE'} decode: "
          + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in sample.items())
          + " TFLOP")
    for cached in (False, True):
        kd = kd_step_flops(table, teacher, size=size, latents_cached=cached)
        print(f"KD sample vs {teacher.name}{' (cached latents)' if cached else ''}: "
              + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in kd.items()) + " TFLOP")


if __name__ == "__main__":
    main()
