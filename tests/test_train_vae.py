"""train_vae.py: a small AutoencoderKL trained on toy scenes learns to reconstruct them, the folder it writes
loads in minisd and diffusers with its data-derived scaling factor, a run resumes exactly, and an overflowing
run neither saves nor overwrites anything."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from minisd.checkpoints.diffusers import load_vae
from minisd.toy.dataset import write_dataset
from train_vae import main as train_vae

CONFIG = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
          "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
          "latent_channels": 4, "sample_size": 64}


@pytest.mark.slow
def test_vae_learns_toy_scenes(tmp_path):
    write_dataset(tmp_path / "toy", n=48, seed=0, heldout=0.0, workers=1)
    (tmp_path / "vae.json").write_text(json.dumps(CONFIG))
    out = tmp_path / "vae"
    assert train_vae(["--data", str(tmp_path / "toy" / "train"), "--config", str(tmp_path / "vae.json"),
                      "--out", str(out), "--resolution", "32", "--batch-size", "8", "--max-steps", "40",
                      "--lr", "1e-3", "--log-steps", "10", "--num-workers", "0"]) == 0
    logged = rows(out)
    # the windows after the first are noisy at this lr: the best of the last two, measured 0.70 of the first
    assert min(r["rec_per_pixel"] for r in logged[-2:]) < 0.75 * logged[0]["rec_per_pixel"]

    vae = load_vae(out)
    assert vae.scaling_factor != 0.18215 and 0.05 < vae.scaling_factor < 50
    reference = AutoencoderKL.from_pretrained(out)
    assert reference.config.scaling_factor == vae.scaling_factor
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(reference.decode(vae.encode(x).mean).sample, vae.decode(vae.encode(x).mean),
                              atol=1e-5)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


def vae_flags(data: Path, out: Path, **options) -> list[str]:
    settings = dict(data=data, out=out, resolution=32, batch_size=4, max_steps=4, lr=1e-3, log_steps=1,
                    save_steps=2, num_workers=0)
    settings.update(options)
    return [arg for k, v in settings.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root / "toy", n=12, seed=0, heldout=0.0, workers=1)
    (root / "vae.json").write_text(json.dumps(CONFIG))
    return root


def test_vae_resume_is_exact(scenes, tmp_path):
    """4 steps in one go, or 2 then 4 in the same --out (train.py's checkpoints, resume and data position):
    the same log rows and the same weights."""
    config = ["--config", str(scenes / "vae.json")]
    assert train_vae(vae_flags(scenes / "toy" / "train", tmp_path / "once") + config) == 0
    assert train_vae(vae_flags(scenes / "toy" / "train", tmp_path / "twice", max_steps=2) + config) == 0
    assert train_vae(vae_flags(scenes / "toy" / "train", tmp_path / "twice") + config) == 0
    once, twice = (rows(tmp_path / run) for run in ("once", "twice"))
    assert [r["step"] for r in twice] == [1, 2, 3, 4]
    for a, b in zip(once, twice):
        assert a["rec"] == pytest.approx(b["rec"], rel=1e-6) and a["kl"] == pytest.approx(b["kl"], rel=1e-6)
    a, b = (load_file(tmp_path / run / "diffusion_pytorch_model.safetensors") for run in ("once", "twice"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_huge_lr_overwrites_nothing(scenes, tmp_path, capsys):
    """--lr 1e30 from --init V: V (its log too) is never written to, nothing is saved from the overflowed
    weights, the run stops on a line of its own naming the last good checkpoint (none), and a re-run, which
    starts again from step 1, logs each step once."""
    start = tmp_path / "start"
    assert train_vae(vae_flags(scenes / "toy" / "train", start, max_steps=2) +
                     ["--config", str(scenes / "vae.json")]) == 0
    before = {p.name: p.read_bytes() for p in start.iterdir() if p.is_file()}
    out = tmp_path / "run"
    argv = vae_flags(scenes / "toy" / "train", out, lr=1e30, save_steps=1, log_steps=2)
    argv += ["--init", str(start)]
    assert train_vae(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_vae.py: error:")]
    assert len(lines) == 1 and "none (none saved yet)" in lines[0], lines
    assert {p.name: p.read_bytes() for p in start.iterdir() if p.is_file()} == before
    assert not list(out.glob("*checkpoint-*")) and not (out / "config.json").exists()
    assert train_vae(argv) == 1 and [r["step"] for r in rows(out)] == [1]


def test_decoder_only_keeps_the_encoder_and_its_scaling_factor(scenes, tmp_path):
    """--decoder-only from --init V: the encoder (so the latents a U-Net was trained on) and V's scaling
    factor stay exactly as they were; the decoder learns. Without --init it is refused."""
    start = tmp_path / "start"
    assert train_vae(vae_flags(scenes / "toy" / "train", start, max_steps=2) +
                     ["--config", str(scenes / "vae.json")]) == 0
    out = tmp_path / "ft"
    assert train_vae(vae_flags(scenes / "toy" / "train", out) + ["--init", str(start), "--decoder-only"]) == 0
    before, after = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (start, out))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2
    assert load_vae(out).scaling_factor == load_vae(start).scaling_factor
    with pytest.raises(SystemExit) as stop:
        train_vae(vae_flags(scenes / "toy" / "train", tmp_path / "bad") +
                  ["--config", str(scenes / "vae.json"), "--decoder-only"])
    assert stop.value.code == 2
