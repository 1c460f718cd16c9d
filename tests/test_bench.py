"""python -m minisd.bench on the CPU at reduced size: its subcommands run and write sane JSON,
Markdown and PNG (no timing is asserted), and minisd's KD step reads no device value on the host."""

import json
import math

import pytest
import torch
from PIL import Image

from minisd.bench.__main__ import main
from minisd.bench.kd_steps import MinisdKD
from minisd.bench.layout import REFERENCE_ATTENTION
from minisd.bench.models import random_pipeline
from minisd.bench.training import make_batches

# one thread: on a CPU shared with other jobs, threads that wait for each other stall badly
SMOKE = ["--config", "tiny", "--small", "--size", "32", "--repeats", "1", "--device", "cpu", "--threads", "1"]


def rows_of(path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["environment"]["device"] and data["environment"]["versions"]["diffusers"] != "not loaded"
    assert data["environment"]["command"].startswith("python -m minisd.bench ")
    return data["rows"]


def positive(*values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_sample_smoke(tmp_path):
    assert main(["sample", *SMOKE, "--steps", "1", "--batch", "1", "2", "--unet-calls", "1", "--out",
                 str(tmp_path)]) == 0
    stem = tmp_path / "sample-cpu-v1-tiny-reduced"
    rows = rows_of(stem.with_suffix(".json"))
    assert [(r["lib"], r["batch"]) for r in rows] == [("minisd", 1), ("diffusers", 1), ("minisd", 2),
                                                      ("diffusers", 2)]
    for r in rows:
        assert positive(r["unet_its"], r["s_per_image"], r["images_per_s"], r["peak_gb"], r["tflops"],
                        r["fraction_of_peak"])
        assert r["images_per_s"] == pytest.approx(1 / r["s_per_image"])
        assert r["config"] == "v1-tiny-reduced" and r["size"] == 32 and not r["compiled"]
    md = stem.with_suffix(".md").read_text()
    assert ("| U-Net it/s |" in md and "images/s, minisd / diffusers" in md
            and "- command: `python -m minisd.bench" in md)
    assert Image.open(stem.with_suffix(".png")).size == (900, 520)


def test_sample_few_step_settings(tmp_path):
    """--scheduler and --vae multiply the configs: PNDM with CFG beside LCM without, SD's VAE beside TAESD."""
    assert main(["sample", *SMOKE, "--scheduler", "pndm", "lcm", "--vae", "sd", "tiny", "--steps", "1",
                 "--batch", "1", "--unet-calls", "1", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path / "sample-cpu-v1-tiny-lcm-taesd-reduced.json")
    ours = [r for r in rows if r["lib"] == "minisd"]
    assert [(r["config"], r["scheduler"], r["unet_calls"], r["vae"]) for r in ours] == [
        ("v1-tiny-reduced", "pndm", 2, "sd"), ("v1-tiny-reduced taesd", "pndm", 2, "tiny"),
        ("v1-tiny-reduced lcm-1", "lcm", 1, "sd"), ("v1-tiny-reduced lcm-1 taesd", "lcm", 1, "tiny")]
    flops = {r["config"]: r["tflops"] / r["images_per_s"] for r in ours}
    # per image: LCM runs one latent a step (no CFG pair)
    assert flops["v1-tiny-reduced lcm-1"] < flops["v1-tiny-reduced"]
    assert all(positive(r["images_per_s"], r["unet_its"]) for r in rows)


def test_layout_smoke(tmp_path):
    """`layout`: every level and variant gets a row, the reference row is 1x, the others relative to it."""
    assert main(["layout", "--config", "tiny", "--small", "--size", "32", "--repeats", "1", "--threads", "1",
                 "--variants", "plain", "fused", "channels_last", "fused + channels_last",
                 "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path / "layout-cpu-tiny-32-reduced.json")
    variants = ["minisd plain", "minisd fused", "minisd channels_last", "minisd fused + channels_last",
                "diffusers"]
    assert [r["variant"] for r in rows if r["level"] == "unet"] == variants
    assert [r["variant"] for r in rows if r["level"] == "transformer"] == variants
    assert len([r for r in rows if r["level"] == "attention"]) == 3
    for r in rows:
        assert positive(r["seconds"], r["vs_reference"])
        if r["variant"] in ("diffusers", REFERENCE_ATTENTION):
            assert r["vs_reference"] == 1.0
    assert "| unet | tiny | minisd plain |" in (tmp_path / "layout-cpu-tiny-32-reduced.md").read_text()


@pytest.mark.slow
def test_train_smoke(tmp_path):
    assert main(["train", *SMOKE, "--batch", "2", "--steps", "1", "--warmup", "1", "--out",
                 str(tmp_path)]) == 0
    stem = tmp_path / "train-cpu-v1-tiny-reduced"
    rows = rows_of(stem.with_suffix(".json"))
    assert [r["lib"] for r in rows] == ["minisd", "minisd (cached)", "BK-SDM reference"]
    for r in rows:
        assert positive(r["samples_per_s"], r["peak_gb"], r["tflops"], r["fraction_of_peak"])
        assert r["syncs_per_step"] is None  # counted on CUDA only
    # the cached step does less work per sample: no VAE encode, no text encoder
    assert rows[1]["tflops"] / rows[1]["samples_per_s"] < rows[0]["tflops"] / rows[0]["samples_per_s"]
    md = stem.with_suffix(".md").read_text()
    assert ("samples/s, minisd / BK-SDM reference" in md
            and "samples/s, minisd (cached) / BK-SDM reference" in md)


def test_bad_arguments(capsys):
    for argv, message in ((["sample", "--batch", "0"], "--batch: 0 is not a whole number >= 1"),
                          (["sample", "--size", "50"], "--size must be a positive multiple of 16"),
                          (["train", "--memory-probe", "--device", "cpu"],
                           "--memory-probe measures GPU memory"),
                          (["train", "--reference-only", "--no-reference"],
                           "--reference-only times the reference step alone")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_kd_step_never_reads_the_device(monkeypatch):
    """train.py's step as the bench runs it, on the meta device, where reading any tensor's value on the
    host raises. Gradient clipping runs without foreach there (meta tensors have no foreach kernels)."""
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm,
                        foreach: clip(params, norm, foreach=False))
    teacher = random_pipeline("v1", "sd", small=True)
    images, cached = make_batches(teacher, 2, 32)
    step = MinisdKD(teacher.to("meta"), "tiny")
    for batch in (images, cached):
        assert step.step(batch).device.type == "meta"
