"""The sampling speed paths change no numbers: fused q/k/v and channels_last give the plain outputs,
the fused U-Net still saves and loads the standard layout, the compiled U-Net gives the eager image,
half-precision images stay within a stated distance of fp32, and the denoising loop never reads a
device tensor on the host (a host-device sync on a GPU)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from reference import rel_diff

from minisd.bench.models import random_pipeline
from minisd.checkpoints.diffusers import load_unet, save_unet
from minisd.schedulers import SAMPLERS

KWARGS = dict(steps=3, height=64, width=64, seed=0, progress=False, output="np")


@pytest.fixture(scope="module")
def pipe():
    """A random BK-small pipeline at an eighth of the width (SD-v1 family)."""
    return random_pipeline("v1", "small", small=True)


def test_fused_qkv_gives_the_same_outputs_and_checkpoints(pipe, tmp_path):
    plain = pipe.unet
    fused = copy.deepcopy(plain).fuse_qkv()
    self_attentions = [name for name, _ in fused.named_modules() if name.endswith("attn1")]
    assert [name for name, m in fused.named_modules()
            if getattr(m, "to_qkv", None) is not None] == self_attentions
    assert len(self_attentions) == 9  # BK-small: 3 down + 6 up blocks with attention
    gen = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(2, 4, 16, 16,
                                generator=gen), torch.randn(2, 77, 96, generator=gen), torch.tensor([3, 900])
    with torch.no_grad():
        assert rel_diff(plain(x, t, context), fused(x, t, context)) < 1e-6
    # state_dict and the saved checkpoint are the standard layout, value for value
    a, b = plain.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_unet(fused, tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        assert rel_diff(plain(x, t, context), loaded(x, t, context)) == 0
        assert rel_diff(plain(x, t, context), theirs(x, t, encoder_hidden_states=context).sample) < 1e-5
    # a standard state dict loads into a fused U-Net
    other = copy.deepcopy(fused)
    for p in other.parameters():
        p.data.zero_()
    other.load_state_dict(a)
    with torch.no_grad():
        assert rel_diff(plain(x, t, context), other(x, t, context)) < 1e-6


def test_cpu_attention_copies_change_no_bit():
    """On the CPU, Attention hands SDPA contiguous q/k/v (faster there); the result is that of the transposed
    views, to the bit, for self- and cross-attention, fused or not."""
    import torch.nn.functional as F

    from minisd.blocks import Attention

    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 256, 64, generator=gen), torch.randn(2, 77, 32, generator=gen)
    for attention, ctx in ((Attention(64, 4), None), (Attention(64, 4, context_dim=32), context)):
        source = x if ctx is None else ctx
        q, k, v = (layer(s).unflatten(-1, (4, -1)).transpose(1, 2)
                   for layer, s in ((attention.to_q, x), (attention.to_k, source), (attention.to_v, source)))
        expected = attention.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        with torch.no_grad():
            assert torch.equal(attention(x, ctx), expected.detach())
            if ctx is None:
                attention.fuse_qkv()
                assert rel_diff(attention(x), expected.detach()) < 1e-6  # one matmul instead of three


def test_fast_paths_give_the_plain_image(pipe):
    expected = pipe("a red square", **KWARGS)
    fast = copy.deepcopy(pipe).fuse_qkv().channels_last()
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(fast("a red square", **KWARGS) - expected).max() <= 1e-5


# How far a half-precision image may be from the fp32 one (pixels in [0, 1]; docs/performance.md).
# Measured on this random reduced BK-small, 5 PNDM steps: bf16 mean 0.0025, max 0.018; fp16 mean 0.0003, max
# 0.002.
HALF_TOLERANCE = {torch.bfloat16: (2 / 255, 16 / 255), torch.float16: (0.5 / 255, 4 / 255)}  # (mean, max)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_image_stays_near_fp32(pipe, dtype):
    kwargs = dict(KWARGS, steps=5)
    expected = pipe("a red square", **kwargs)
    half = random_pipeline("v1", "small", small=True, dtype=dtype)  # the same seed: pipe's weights, rounded
    assert half.unet.conv_in.weight.dtype == dtype
    diff = np.abs(half("a red square", **kwargs) - expected)
    mean, most = HALF_TOLERANCE[dtype]
    assert np.isfinite(diff).all() and diff.mean() <= mean and diff.max() <= most, (diff.mean(), diff.max())


@pytest.mark.parametrize("scheduler", SAMPLERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_denoising_loop_never_reads_the_device(pipe, scheduler, guidance):
    """On the meta device tensors have shapes but no values: any .item(), int(t), bool(x) or Python
    branch on a tensor's value in the loop raises, as it would stall the host on a GPU."""
    meta = copy.deepcopy(pipe).to("meta")
    latents = meta(["a", "b"], steps=4, guidance=guidance, height=64, width=64, scheduler=scheduler,
                   seed_mode="per_image", progress=False, output="latent")
    assert latents.device.type == "meta" and latents.shape == (2, 4, 32, 32)


@pytest.mark.slow  # compiling on the CPU takes a couple of minutes
def test_compiled_unet_gives_the_eager_image(pipe):
    expected = pipe("a red square", **KWARGS)
    compiled = copy.deepcopy(pipe).compile()
    compiled.warm_up(height=64, width=64)
    assert np.abs(compiled("a red square", **KWARGS) - expected).max() <= 1e-4
