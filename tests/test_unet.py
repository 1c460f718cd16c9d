"""U-Net parity: diffusers' UNet2DConditionModel with random weights, saved in hub layout,
loaded through minisd's stage/block table and key rules, must give the same output."""

import dataclasses

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
from reference import BK_CHANGES, SD_V1_CONFIG, perturb_, real_config, reduced_config, rel_diff
from safetensors.torch import load_file, save_file

from minisd.blocks import guidance_embedding
from minisd.checkpoints.diffusers import load_unet, save_unet, unet_config_from_table, unet_table_from_config
from minisd.checkpoints.ldm import UNET_PREFIX, detect_unet, unet_from_ldm, unet_to_ldm
from minisd.checkpoints.remap import CheckpointError
from minisd.table import SD_V1, SD_V2, TEACHERS, VARIANTS, variant
from minisd.unet import UNet, count_params, describe, with_guidance_embedding

PARAMS = {  # diffusers' parameter counts for these configs (docs/bksdm.md)
    ("v1", "sd"): 859_520_964, ("v1", "base"): 579_384_964, ("v1", "small"): 482_346_884,
    ("v1", "tiny"): 323_384_964, ("v2", "sd"): 865_910_724, ("v2", "base"): 583_480_964,
    ("v2", "small"): 485_787_524, ("v2", "tiny"): 326_825_604,
}


def check_parity(cfg: dict, tmp_path, size: int = 16, batch: int = 2) -> float:
    torch.manual_seed(0)
    ref = perturb_(UNet2DConditionModel(**cfg)).eval()
    ref.save_pretrained(tmp_path)
    mine = load_unet(tmp_path).eval()
    x = torch.randn(batch, 4, size, size)
    t = torch.tensor([981, 1][:batch])
    context = torch.randn(batch, 77, cfg["cross_attention_dim"])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = mine(x, t, context)
    return rel_diff(expected, got)


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", list(BK_CHANGES))
def test_parity_reduced_width(family, name, tmp_path):
    assert check_parity(reduced_config(family, name), tmp_path) <= 1e-4


@pytest.mark.slow
def test_parity_full_size_sd_v1(tmp_path):
    """The real 0.86B SD-v1.4 U-Net, at a small latent: the proof that real checkpoints load."""
    assert check_parity(real_config("v1", "sd"), tmp_path, size=16, batch=1) <= 1e-4


@pytest.mark.slow
def test_parity_full_size_bk_tiny(tmp_path):
    assert check_parity(real_config("v1", "tiny"), tmp_path, size=16, batch=1) <= 1e-4


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_from_table(family, name):
    table = variant(TEACHERS[family], name)
    assert count_params(table)["total"] == PARAMS[family, name]
    with torch.device("meta"):
        reference = UNet2DConditionModel(**real_config(family, name))
    assert sum(p.numel() for p in reference.parameters()) == PARAMS[family, name]


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_student_tables_write_the_hub_configs(family, name):
    """A BK-SDM table writes the config nota-ai's repos ship, and reads back to the same shape."""
    table = variant(TEACHERS[family], name)
    cfg = unet_config_from_table(table)
    for key, value in real_config(family, name).items():
        expected = value if not isinstance(value, list) or len(set(value)) > 1 else value[0]
        if key in ("down_block_types", "up_block_types", "block_out_channels"):
            expected = value
        assert cfg[key] == expected, key
    back = unet_table_from_config(cfg)
    assert [(s.channels, s.attention, s.heads, len(s.down), len(s.up)) for s in back.stages] == \
           [(s.channels, s.attention, s.heads, len(s.down), len(s.up)) for s in table.stages]
    assert back.mid == table.mid and back.linear_proj == table.linear_proj


def test_save_loads_in_diffusers(tmp_path):
    torch.manual_seed(1)
    ref = perturb_(UNet2DConditionModel(**reduced_config("v2", "small"))).eval()
    ref.save_pretrained(tmp_path / "ref")
    mine = load_unet(tmp_path / "ref").eval()
    save_unet(mine, tmp_path / "mine")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "mine").eval()
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 128)
    with torch.no_grad():
        assert torch.equal(ref(x, 500, context).sample, again(x, 500, context).sample)


def test_strict_loading_names_every_bad_key(tmp_path):
    UNet2DConditionModel(**reduced_config("v1", "tiny")).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    del sd["down_blocks.1.attentions.0.proj_in.weight"]
    sd["down_blocks.1.attentions.0.extra.weight"] = torch.zeros(1)
    sd["conv_in.bias"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_unet(tmp_path)
    message = str(err.value)
    assert "missing keys (1)" in message and "down_blocks.1.attentions.0.proj_in.weight" in message
    assert "unexpected keys (1)" in message and "down_blocks.1.attentions.0.extra.weight" in message
    assert "conv_in.bias: checkpoint (3,), model (40,)" in message


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        unet_table_from_config(dict(SD_V1_CONFIG, class_embed_type="timestep"))


def test_table_printout_shows_removals():
    text = describe(variant(SD_V1, "tiny"), SD_V1)
    assert "+0 -1" in text and "+0 -1 +2" in text and "(stage removed)" in text and "323,384,964" in text
    assert "removed" in describe(variant(SD_V2, "small"), SD_V2)


# ---- LCM U-Nets: the guidance embedding (time_cond_proj_dim) -------------------------------------------

def test_guidance_embedding_matches_diffusers():
    w = torch.tensor([0.0, 1.5, 7.0, 14.0])
    for dim in (256, 7):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), expected)


def test_parity_with_guidance_embedding(tmp_path):
    """An LCM U-Net (BK-SDM-Tiny's shape, reduced) conditioned on w: the same output as diffusers' with
    timestep_cond, and saved back in a layout diffusers loads."""
    cfg = dict(reduced_config("v1", "tiny"), time_cond_proj_dim=32)
    torch.manual_seed(0)
    ref = perturb_(UNet2DConditionModel(**cfg)).eval()
    with torch.no_grad():
        ref.time_embedding.cond_proj.weight.mul_(20)  # so that w moves the output well above the tolerance
    ref.save_pretrained(tmp_path / "ref")
    mine = load_unet(tmp_path / "ref").eval()
    assert mine.config.guidance_embed_dim == 32 and mine.config.name == "custom-lcm"  # reduced width
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([999, 259]), torch.randn(2, 77, 96)
    w = torch.tensor([7.0, 2.5])
    with torch.no_grad():
        expected = ref(x, t, context, timestep_cond=guidance_embedding(w, 32)).sample
        got = mine(x, t, context, w=w)
        assert rel_diff(expected, got) <= 1e-4
        assert rel_diff(got, mine(x, t, context, w=torch.tensor([3.0, 2.5]))) > 1e-3
        assert rel_diff(ref(x, t, context).sample, mine(x, t, context)) <= 1e-4  # no w: nothing added
    save_unet(mine, tmp_path / "mine")
    assert unet_config_from_table(mine.config)["time_cond_proj_dim"] == 32
    again = UNet2DConditionModel.from_pretrained(tmp_path / "mine").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, context, timestep_cond=guidance_embedding(w, 32)).sample, expected)


def test_guidance_embedding_in_single_files(tmp_path):
    """LCM single files keep the embedding under diffusers' name (time_embedding.cond_proj under the U-Net's
    prefix), and the variant is still detected from the other keys."""
    table = dataclasses.replace(variant(SD_V1, "tiny"), guidance_embed_dim=256)
    with torch.device("meta"):
        keys = unet_to_ldm(UNet(table))
    assert keys[UNET_PREFIX + "time_embedding.cond_proj.weight"].shape == (320, 256)
    found = detect_unet({k.removeprefix(UNET_PREFIX): v for k, v in keys.items()})
    assert found.guidance_embed_dim == 256 and found.name == "sd-v1-tiny-lcm"
    small = dataclasses.replace(reduced_table("tiny"), guidance_embed_dim=8)
    torch.manual_seed(0)
    unet = UNet(small).eval()
    again = unet_from_ldm(unet_to_ldm(unet), small).eval()
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))


def test_w_without_guidance_embedding_is_refused():
    unet = UNet(reduced_table("tiny"))
    with pytest.raises(ValueError, match="no guidance embedding"):
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 96), w=3.0)


def test_with_guidance_embedding():
    """The start of a full LCD: the same U-Net plus guidance_proj; without w it computes what it did."""
    torch.manual_seed(0)
    unet = perturb_(UNet(reduced_table("small"))).eval()
    lcm = with_guidance_embedding(unet, 16).eval()
    assert lcm.config.guidance_embed_dim == 16 and lcm.config.name == "unet-lcm"
    assert lcm.guidance_proj.weight.shape == (40, 16)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 96)
    with torch.no_grad():
        assert torch.equal(unet(x, 500, context), lcm(x, 500, context))
        assert rel_diff(lcm(x, 500, context), lcm(x, 500, context, w=7.0)) > 1e-4
    with pytest.raises(ValueError, match="already"):
        with_guidance_embedding(lcm)


def reduced_table(name: str):
    return unet_table_from_config(reduced_config("v1", name))
