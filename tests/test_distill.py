"""Distillation, read off the table: student init and KD pairs must equal BK-SDM's published
lists (docs/bksdm.md) key for key, and the taps must be the features BK-SDM's hooks grab."""

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from reference import perturb_, reduced_config

from minisd.checkpoints.diffusers import load_unet, unet_rules, unet_table_from_config
from minisd.checkpoints.remap import rename
from minisd.distill import feature_pairs, init_map, kd_losses, student_from_teacher
from minisd.table import TEACHERS, variant
from minisd.unet import UNet


def bk_teacher_key(student_key: str, name: str) -> str:
    """BK-SDM's `--use_copy_weight_from_teacher` list, as docs/bksdm.md states it (diffusers names)."""
    m = re.match(r"up_blocks\.(\d+)\.(.*)", student_key)
    if not m:
        return student_key  # down blocks, mid block, stem: same name
    j, rest = int(m.group(1)), m.group(2)
    if name == "tiny":
        j += 1  # student up stage j is teacher up stage j+1
    rest = re.sub(r"^(resnets|attentions)\.1\.", r"\1.2.", rest)  # kept up blocks: the 1st and the 3rd
    return f"up_blocks.{j}.{rest}"


BK_PAIRS = {  # (teacher, student) feature pairs, docs/bksdm.md
    "base": [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)]
            + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "tiny": [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
             ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
             ("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2")],
}
BK_PAIRS["small"] = BK_PAIRS["base"]


def tap_in_diffusers(tap: str, stages: int) -> str:
    m = re.fullmatch(r"(down|up)\.(\d+)(\.blocks\.(\d+)\.attn\.proj_out)?", tap)
    path, s = m.group(1), int(m.group(2))
    if m.group(3):
        return f"down_blocks.{s}.attentions.{m.group(4)}.proj_out"
    return f"down_blocks.{s}" if path == "down" else f"up_blocks.{stages - 1 - s}"


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", ["base", "small", "tiny"])
def test_student_init_is_bk_sdms_mapping(family, name):
    teacher = TEACHERS[family]
    student = variant(teacher, name)
    prefixes = init_map(student, teacher)
    with torch.device("meta"):
        keys = list(UNet(student).state_dict())
    s_rules, t_rules = unet_rules(student), unet_rules(teacher)
    for key in keys:
        prefix = next(p for p in prefixes if key.startswith(p))
        teacher_key = rename(prefixes[prefix] + key[len(prefix):], t_rules)
        student_key = rename(key, s_rules)
        assert teacher_key == bk_teacher_key(student_key, name), student_key


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("name", ["base", "small", "tiny"])
def test_feature_pairs_are_bk_sdms(family, name):
    teacher = TEACHERS[family]
    student = variant(teacher, name)
    pairs = [(tap_in_diffusers(t, len(teacher.stages)), tap_in_diffusers(s, len(student.stages)))
             for t, s in feature_pairs(student, teacher)]
    assert pairs == BK_PAIRS[name]


def small_teacher():
    torch.manual_seed(0)
    ref = perturb_(UNet2DConditionModel(**reduced_config("v1", "sd"))).eval()
    return ref


def test_taps_equal_bk_sdms_hooked_features(tmp_path):
    """The taps are what BK-SDM's forward hooks on diffusers' modules capture (first tuple element)."""
    ref = small_teacher()
    ref.save_pretrained(tmp_path)
    ours = load_unet(tmp_path).eval()
    hooked = {}
    names = {t for pairs in BK_PAIRS.values() for t, _ in pairs}
    for name in names:
        module = ref.get_submodule(name)
        module.register_forward_hook(lambda m, i, o,
                                     name=name: hooked.__setitem__(name, o[0] if isinstance(o, tuple) else o))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 96)
    taps = ["down.0", "down.1", "down.2", "down.3", "up.0", "up.1", "up.2", "up.3",
            "down.2.blocks.1.attn.proj_out"]
    with torch.no_grad():
        expected = ref(x, 300, context).sample
        out, feats = ours(x, 300, context, taps=taps)
    assert torch.allclose(out, expected, atol=1e-5)
    for tap in taps:
        assert torch.allclose(feats[tap], hooked[tap_in_diffusers(tap, 4)], atol=1e-5), tap


@pytest.mark.parametrize("name", ["base", "small", "tiny"])
def test_student_blocks_start_as_teacher_blocks(name, tmp_path):
    """Every kept block of a fresh student computes what the teacher block it replaces computes."""
    ref = small_teacher()
    ref.save_pretrained(tmp_path)
    teacher = load_unet(tmp_path).eval()
    student = student_from_teacher(teacher, variant(teacher.config, name)).eval()
    prefixes = init_map(student.config, teacher.config)
    temb, context = torch.randn(2, teacher.config.temb_dim), torch.randn(2, 77, 96)
    for s_prefix, t_prefix in prefixes.items():
        s_mod, t_mod = (student.get_submodule(s_prefix.rstrip(".")),
                        teacher.get_submodule(t_prefix.rstrip(".")))
        if s_prefix.count(".") != 4:  # whole blocks only: down.{s}.blocks.{b}. / up.{s}.blocks.{b}.
            assert all(torch.equal(a, b)
                       for a, b in zip(s_mod.state_dict().values(), t_mod.state_dict().values()))
            continue
        channels = s_mod.res.norm1.num_channels
        x = torch.randn(2, channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(s_mod(x, temb, context), t_mod(x, temb, context)), s_prefix


def test_sd_variant_has_zero_kd_loss(tmp_path):
    ref = small_teacher()
    ref.save_pretrained(tmp_path)
    teacher = load_unet(tmp_path).eval()
    student = student_from_teacher(teacher, variant(teacher.config, "sd")).eval()
    pairs = feature_pairs(student.config, teacher.config)
    x, context, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 96), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        t_out, t_feats = teacher(x, 500, context, taps=[t for t, _ in pairs])
        s_out, s_feats = student(x, 500, context, taps=[s for _, s in pairs])
    losses = kd_losses(s_out, noise, t_out, s_feats, t_feats, pairs)
    assert losses["out"].item() == 0.0 and losses["feat"].item() == 0.0 and losses["sd"].item() > 0.0


def test_weighted_denoising_loss():
    """kd_losses' weights scale each sample's squared error before the batch mean; the KD terms are
    unweighted."""
    out, target, teacher_out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    per_sample = (out - target).pow(2).mean((1, 2, 3))
    plain = kd_losses(out, target, teacher_out, {}, {}, [])
    ones = kd_losses(out, target, teacher_out, {}, {}, [], torch.ones(3))
    weighted = kd_losses(out, target, teacher_out, {}, {}, [], torch.tensor([2.0, 0.0, 0.5]))
    torch.testing.assert_close(ones["sd"], plain["sd"])
    torch.testing.assert_close(weighted["sd"], (2 * per_sample[0] + 0.5 * per_sample[2]) / 3)
    assert weighted["out"] == plain["out"]


def test_reduced_students_load_from_their_configs():
    """unet_table_from_config of a student config gives the same architecture as the variant table."""
    for name in ("base", "small", "tiny"):
        student = variant(TEACHERS["v1"], name)
        cfg = reduced_config("v1", name)
        table = unet_table_from_config(cfg)
        assert [len(s.down) for s in table.stages] == [len(s.down) for s in student.stages]
        assert table.mid == student.mid
