"""The analytic MAC counter against the figures in docs/bksdm.md ("Compute per image") and
against torch's FlopCounterMode on real forwards of tiny configs."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minisd.clip import CLIPTextConfig, CLIPTextEncoder
from minisd.flops import (
    kd_step_flops,
    main,
    sampling_flops,
    text_encoder_macs,
    unet_macs,
    vae_decoder_macs,
    vae_encoder_macs,
)
from minisd.table import SD_V1, Stage, UNetTable, variant
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.vae_tiny import TAESD, AutoencoderTiny, TinyVAEConfig

TFLOP = 1e12


def close(got: float, expected: float, rel: float) -> bool:
    return abs(got - expected) <= rel * expected


def test_sd_v1_unet_matches_reference_counter():
    # 338.7 GMACs by BK-SDM's reference counter: every Conv2d and Linear, no attention matmuls.
    macs = unet_macs(SD_V1, 64, 64, attention_matmuls=False)
    assert close(macs["total"], 338.7e9, 0.005), macs["total"]
    assert macs["total"] == sum(v for k, v in macs.items() if k != "total")


def test_sd_v1_unet_with_attention_matmuls():
    flops = 2 * unet_macs(SD_V1, 64, 64)["total"]
    assert 0.78 * TFLOP <= flops <= 0.82 * TFLOP, flops


@pytest.mark.parametrize("name, tflop", [("base", 0.52), ("small", 0.51), ("tiny", 0.49)])
def test_bk_students_unet(name, tflop):
    flops = 2 * unet_macs(variant(SD_V1, name), 64, 64)["total"]
    assert close(flops, tflop * TFLOP, 0.03), flops


def test_batch_scales_linearly():
    one, two = unet_macs(variant(SD_V1, "tiny"), 32, 32), unet_macs(variant(SD_V1, "tiny"), 32, 32, batch=2)
    assert two == {k: 2 * v for k, v in one.items()}


@pytest.mark.parametrize("name, tflop", [("sd", 42.7), ("small", 28.1)])
def test_image_with_cfg_25_steps(name, tflop):
    flops = sampling_flops(variant(SD_V1, name), size=512, steps=25, guidance=True)
    assert close(flops["total"], tflop * TFLOP, 0.03), flops
    assert close(flops["vae_decode"], 2.5 * TFLOP, 0.03), flops


@pytest.mark.parametrize("cached, tflop", [(False, 3.5), (True, 2.3)])
def test_bk_small_kd_sample(cached, tflop):
    flops = kd_step_flops(variant(SD_V1, "small"), SD_V1, size=512, latents_cached=cached)
    assert close(flops["total"], tflop * TFLOP, 0.05), flops
    assert (flops["vae_encode"] == 0) == cached


def brute_force_flops(model, *inputs) -> int:
    """FLOPs by FlopCounterMode on a real forward. The math SDPA backend runs attention as bmm,
    which FlopCounterMode counts (the fused CPU kernel is not in its registry)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    return counter.get_total_flops()


TINY_UNET = UNetTable("tiny-test",
                      (Stage(32, True, 2, (0, 1), (0, 1, 2)), Stage(64, True, 4, (0, 1), (0, 1, 2)),
                                    Stage(64, False, 4, (0, 1), (0, 1, 2))), mid=True, context_dim=16,
                      groups=8)


@pytest.mark.parametrize("table", [TINY_UNET, variant(TINY_UNET, "small", stages=3)],
                         ids=["teacher", "small"])
def test_unet_matches_flop_counter(table):
    from minisd.unet import UNet

    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 12), torch.tensor([3.0, 500.0]), torch.randn(2, 77, 16)
    assert brute_force_flops(UNet(table).eval(), x, t,
                             context) == 2 * unet_macs(table, 16, 12, batch=2)["total"]


def test_vae_matches_flop_counter():
    cfg = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)  # 2 levels: 2 px per latent
    vae = AutoencoderKL(cfg).eval()
    assert brute_force_flops(lambda x: vae.encode(x).mean, torch.randn(2, 3, 16, 12)) == \
        2 * vae_encoder_macs(cfg, 16, 12, batch=2)["total"]
    assert brute_force_flops(vae.decode,
                             torch.randn(2, 4, 8, 6)) == 2 * vae_decoder_macs(cfg, 16, 12, batch=2)["total"]


def test_text_encoder_matches_flop_counter():
    cfg = CLIPTextConfig(width=32, layers=2, heads=4, mlp_width=64, vocab_size=100, max_positions=77)
    ids = torch.randint(0, 100, (2, 77))
    assert brute_force_flops(CLIPTextEncoder(cfg).eval(), ids) == 2 * text_encoder_macs(cfg, batch=2)["total"]


@pytest.mark.slow  # runs the full-size models on the meta device
def test_cli_prints_table(capsys):
    main(["--family", "v1", "--variant", "small", "--size", "512"])
    out = capsys.readouterr().out
    assert "stage 3" in out and "total" in out and "TFLOP" in out
    main(["--variant", "tiny", "--lcm", "--steps", "4", "--vae", "tiny"])
    assert "4 steps LCM, no CFG, TAESD decode: unet 1.94, vae_decode 0.14" in capsys.readouterr().out


def test_tiny_vae_matches_flop_counter():
    cfg = TinyVAEConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 2, 2),
                        decoder_blocks=(2, 2, 1))
    vae = AutoencoderTiny(cfg).eval()
    assert brute_force_flops(vae.encode, torch.randn(2, 3, 16, 12)) == \
        2 * vae_encoder_macs(cfg, 16, 12, batch=2)["total"]
    assert brute_force_flops(vae.decode, torch.randn(2, 4, 4, 3)) == \
        2 * vae_decoder_macs(cfg, 16, 12, batch=2)["total"]


def test_lcm_unet_counts_its_guidance_embedding():
    """An LCM U-Net runs one latent a step (no CFG pair) and its guidance projection is counted."""
    from minisd.unet import UNet

    table = dataclasses.replace(TINY_UNET, guidance_embed_dim=16)
    x, t, context = torch.randn(2, 4, 16, 12), torch.tensor([3.0, 500.0]), torch.randn(2, 77, 16)
    assert brute_force_flops(UNet(table).eval(), x, t, context, None, torch.tensor([1.0, 6.5])) == \
        2 * unet_macs(table, 16, 12, batch=2)["total"]
    assert unet_macs(table, 16, 12)["stem"] - unet_macs(TINY_UNET, 16, 12)["stem"] == 16 * 32


def test_few_step_image():
    """BK-SDM-Tiny, 4 LCM steps without a CFG pass, TAESD's decoder: 2.1 TFLOP, 1/20 of SD-v1.4's 25 steps
    with CFG (42.7); with SD's decoder 4.5, the decoder then over half of it."""
    lcm = dataclasses.replace(variant(SD_V1, "tiny"), guidance_embed_dim=256)
    tiny = sampling_flops(lcm, TAESD, size=512, steps=4, guidance=False)
    assert close(tiny["total"], 2.10 * TFLOP, 0.02) and close(tiny["vae_decode"], 0.14 * TFLOP, 0.05), tiny
    kl = sampling_flops(lcm, size=512, steps=4, guidance=False)
    assert close(kl["total"], 4.46 * TFLOP, 0.02) and kl["vae_decode"] > kl["unet"], kl
    assert sampling_flops(SD_V1, size=512, steps=25)["total"] / tiny["total"] > 20
