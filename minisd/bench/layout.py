"""`python -m minisd.bench layout`: the U-Net and its transformer, minisd against diffusers, timed at the size
users run (512 px: a 64x64 latent) on the CPU, with minisd's two layout options apart, to find where a
difference comes from.

Three levels, each timed alternately (A B C ... then C B A ..., after an untimed call each), median kept:
  unet         the whole U-Net forward at batch 2 (one CFG pass of one image);
  transformer  the U-Net's first SpatialTransformer (diffusers' Transformer2DModel) alone: 320 channels,
               64x64 = 4096 tokens, 8 heads, 77 text tokens (SD-v1);
  attention    its self-attention's core alone, F.scaled_dot_product_attention on q/k/v as each path hands
               them over: transposed views of three Linears (diffusers), views of one fused Linear cut in
               three, and the three views copied contiguous first (minisd on the CPU; the copies timed).
minisd runs as sample.py runs it ("plain"), with fused q/k/v, with channels_last, and with both (the bench's
and --compile's speed path); diffusers as a user gets it (SDPA). Same random weights, fp32, the inputs as the
pipeline feeds them (contiguous latents, text states [2, 77, 768]).
"""

import copy

import torch
import torch.nn.functional as F

from minisd.bench.measure import alternate, median
from minisd.bench.models import random_pipeline
from minisd.blocks import SpatialTransformer, fuse_all_qkv

VARIANTS = {"plain": (False, False), "fused": (True, False), "channels_last": (False, True),
            "fused + channels_last": (True, True)}  # name -> (fuse_qkv, channels_last)
REFERENCE_ATTENTION = "views of three Linears (diffusers)"


def prepared(module: torch.nn.Module, fused: bool, channels_last: bool) -> torch.nn.Module:
    """A copy of a minisd module (a U-Net or one of its blocks) with its layout options applied as
    Pipeline.fuse_qkv/channels_last apply them."""
    module = copy.deepcopy(module)
    if fused:
        fuse_all_qkv(module)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def timings(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, alternating, after one untimed call each."""
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        seconds, _ = alternate(runs, repeats, torch.device("cpu"))
    return {name: median(values) for name, values in seconds.items()}


def rows_of(level: str, config: str, seconds: dict[str, float], reference: str | None) -> list[dict]:
    base = seconds.get(reference) if reference else None
    return [dict(level=level, config=config, variant=name, seconds=s,
                 vs_reference=None if base is None else base / s) for name, s in seconds.items()]


def unet_level(unet, ref_unet, x, t, context, repeats: int, variants: list[str]) -> dict[str, float]:
    """The whole U-Net; one minisd copy per variant but "plain" (SD's U-Net is 3.4 GB in fp32: fewer
    --variants where memory is short)."""
    runs = {}
    for name in variants:
        model = unet if name == "plain" else prepared(unet, *VARIANTS[name])
        runs[f"minisd {name}"] = lambda m=model: m(x, t, context)
    if ref_unet is not None:
        runs["diffusers"] = lambda: ref_unet(x, t, encoder_hidden_states=context, return_dict=False)
    return timings(runs, repeats)


def transformer_level(unet, ref_unet, x, context, repeats: int) -> dict[str, float]:
    """The first SpatialTransformer, on the feature map it sees in the U-Net (x: [2, 320, 64, 64])."""
    first = first_transformer(unet)
    runs = {}
    for name, options in VARIANTS.items():
        block = prepared(first, *options)
        feature = x.contiguous(memory_format=torch.channels_last) if options[1] else x
        runs[f"minisd {name}"] = lambda b=block, f=feature: b(f, context)
    if ref_unet is not None:
        ref_block = ref_unet.down_blocks[0].attentions[0]
        runs["diffusers"] = lambda: ref_block(x, encoder_hidden_states=context, return_dict=False)
    return timings(runs, repeats)


def first_transformer(unet) -> torch.nn.Module:
    return next(m for m in unet.modules() if isinstance(m, SpatialTransformer))


def attention_level(tokens: torch.Tensor, weight: torch.Tensor, heads: int, repeats: int) -> dict[str, float]:
    """SDPA alone on q/k/v [B, heads, N, head_dim] as each path hands them over (the projections are outside
    the timing): the transposed views of three Linears (diffusers), the views of one fused Linear's chunks,
    and the three views copied contiguous first, the copies timed (minisd on the CPU, blocks.Attention)."""
    def split(t):  # [B, N, heads*head_dim] -> [B, heads, N, head_dim]
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    with torch.inference_mode():
        separate = [split(F.linear(tokens, w)) for w in weight.chunk(3)]
        fused = [split(t) for t in F.linear(tokens, weight).chunk(3, dim=-1)]
    runs = {REFERENCE_ATTENTION: lambda: F.scaled_dot_product_attention(*separate),
            "views of one fused Linear": lambda: F.scaled_dot_product_attention(*fused),
            "three Linears copied contiguous, copies timed (minisd)":
                lambda: F.scaled_dot_product_attention(*(t.contiguous() for t in separate))}
    return timings(runs, repeats)


def run(args) -> list[dict]:
    rows = []
    for name in args.config:
        pipe = random_pipeline("v1", name, small=args.small)
        unet = pipe.unet
        ref_unet = None
        if not args.no_reference:
            from minisd.bench.reference import diffusers_unet

            ref_unet = diffusers_unet(unet)
        latent = args.size // 8
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, unet.config.in_channels, latent, latent, generator=gen)
        context = torch.randn(2, 77, unet.config.context_dim, generator=gen)
        t = torch.tensor([999, 999])
        reference = None if ref_unet is None else "diffusers"
        rows += rows_of("unet", name, unet_level(unet, ref_unet, x, t, context, args.repeats, args.variants),
                        reference)
        with torch.inference_mode():  # the feature map the first transformer sees: conv_in, then a ResBlock
            feature = first_feature(unet, x, t, context)
        seconds = transformer_level(unet, ref_unet, feature, context, args.repeats)
        rows += rows_of("transformer", name, seconds, reference)
        block = first_transformer(unet).transformer_blocks[0]
        with torch.inference_mode():
            tokens = block.norm1(feature.flatten(2).transpose(1, 2))
        weight = torch.cat([block.attn1.to_q.weight, block.attn1.to_k.weight, block.attn1.to_v.weight])
        rows += rows_of("attention", name, attention_level(tokens, weight, block.attn1.heads, args.repeats),
                        REFERENCE_ATTENTION)
        del pipe, unet, ref_unet
    return rows


def first_feature(unet, x, t, context) -> torch.Tensor:
    """The input of the U-Net's first SpatialTransformer, caught by a forward pre-hook."""
    caught = {}

    def catch(module, args):  # returns None: a pre-hook's return value would replace the arguments
        caught.setdefault("x", args[0])

    handle = first_transformer(unet).register_forward_pre_hook(catch)
    try:
        unet(x, t, context)
    finally:
        handle.remove()
    return caught["x"].contiguous()
