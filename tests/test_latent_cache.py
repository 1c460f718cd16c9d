"""train.py --cache-latents: a run from the cache logs the losses of a run from the images with
--no-flip, an interrupted caching resumes where it stopped, and bad combinations are refused."""

import pytest
import torch
from reference import VAE_SMALL, reduced_config, reference_parts, save_hub_layout, text_config
from safetensors.torch import load_file
from test_train import flags, log_rows, write_images, write_metadata

import train
from minisd import latent_cache
from minisd.distill import feature_pairs, student_from_teacher
from minisd.kd_step import kd_step
from minisd.pipeline import load_pipeline
from minisd.schedulers import NoiseSchedule
from minisd.table import variant


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A reduced SD-v1 pipeline (1/8-width U-Net, 2-layer CLIP, 2-level VAE) in hub layout, random weights."""
    parts = reference_parts("v1", reduced_config("v1", "sd"), text_config("v1", 96, 2, 4), VAE_SMALL)
    return save_hub_layout(parts, "v1", tmp_path_factory.mktemp("teacher"))[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 readable images and one missing file: 9 rows, so each epoch skips one sample."""
    folder = tmp_path_factory.mktemp("data")
    write_metadata(folder, write_images(folder, 8) + ["missing.png"])
    return folder


@pytest.mark.slow
def test_cache_gives_the_losses_of_the_images(teacher, data, tmp_path):
    """5 steps of 3 over 9 rows cross two epochs: the same timesteps, noise, posterior draws and skips."""
    options = dict(batch_size=3, global_batch=3, max_steps=5, log_steps=1, lr=1e-3)
    assert train.main(flags(teacher, data, tmp_path / "images", **options) + ["--no-flip"]) == 0
    cache = tmp_path / "cache"
    assert train.main(flags(teacher, data, tmp_path / "cached", cache_latents=cache, **options)) == 0
    images, cached = log_rows(tmp_path / "images"), log_rows(tmp_path / "cached")
    assert [r["step"] for r in cached] == [1, 2, 3, 4, 5]
    for a, b in zip(images, cached, strict=True):
        for key in ("loss", "sd", "out", "feat"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert (a["epoch"], a["skipped"]) == (b["epoch"], b["skipped"])
    assert cached[-1]["skipped"] == 2  # the missing image, once per epoch
    shard = load_file(cache / "shard-00000.safetensors")
    assert shard["valid"].tolist() == [1] * 8 + [0] and shard["mean"].shape == (9, 4, 16, 16)
    assert shard["context"].shape == (9, 77, 96)
    # a second run reuses the cache (nothing rebuilt) and resumes from the first run's last checkpoint
    mtime = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    assert train.main(flags(teacher, data, tmp_path / "cached", cache_latents=cache,
                            **dict(options, max_steps=6))) == 0
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    assert [r["step"] for r in log_rows(tmp_path / "cached")] == [1, 2, 3, 4, 5, 6]


def test_interrupted_caching_resumes(teacher, data, tmp_path, monkeypatch):
    pipe = load_pipeline(teacher)
    whole = tmp_path / "whole"
    assert latent_cache.build(pipe, data, whole, 32, batch_size=2, num_workers=0, shard_size=4) == [0, 1, 2]

    writes = []
    real_write = latent_cache.write_state_dict

    def killed_at_second_shard(path, tensors):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        real_write(path, tensors)

    monkeypatch.setattr(latent_cache, "write_state_dict", killed_at_second_shard)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        latent_cache.build(pipe, data, cut, 32, batch_size=2, num_workers=0, shard_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in cut.glob("shard-*")) == ["shard-00000.safetensors"]
    assert latent_cache.build(pipe, data, cut, 32, batch_size=2, num_workers=0, shard_size=4) == [1, 2]
    assert latent_cache.build(pipe, data, cut, 32, batch_size=2, num_workers=0, shard_size=4) == []
    for k in range(3):
        a = load_file(whole / f"shard-{k:05d}.safetensors")
        b = load_file(cut / f"shard-{k:05d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), k
    # two ranks split the shards: rank 1 of 2 writes shard 1 only
    split = tmp_path / "split"
    assert latent_cache.build(pipe, data, split, 32, 2, 0, rank=1, world_size=2, shard_size=4) == [1]
    with pytest.raises(FileNotFoundError, match="shard-00000.safetensors, shard-00002.safetensors"):
        latent_cache.CachedDataset(split, data)


def test_refusals(teacher, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(flags(teacher, data, tmp_path / "x",
                         cache_latents=tmp_path / "c") + ["--plain", "--train-text-encoder"])
    assert stop.value.code == 2 and "drop --cache-latents or --train-text-encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(flags(teacher, data, tmp_path / "x", cache_latents=tmp_path / "c") + ["--random-crop"])
    assert "drop --random-crop" in capsys.readouterr().err
    pipe = load_pipeline(teacher)
    latent_cache.build(pipe, data, tmp_path / "c", 32, 4, 0)
    with pytest.raises(ValueError, match="holds another cache .*resolution: 32 there, 48 now"):
        latent_cache.build(pipe, data, tmp_path / "c", 48, 4, 0)
    (tmp_path / "shards").mkdir()
    with pytest.raises(ValueError, match="needs an image folder"):
        latent_cache.build(pipe, tmp_path / "shards", tmp_path / "d", 32, 4, 0)


def test_text_states_cached_in_another_precision_reach_the_teacher_in_its_own(teacher):
    """A bf16 teacher (as on CUDA) given text states cached in fp32 (as a CPU run writes them): the cache is
    cast to the teacher's dtype, since a bf16 U-Net refuses fp32 keys and values."""
    pipe = load_pipeline(teacher).to(dtype=torch.bfloat16)
    student = student_from_teacher(pipe.unet, variant(pipe.unet.config, "small"))
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(["a red circle", "a blue square"])).float()
    moments = torch.zeros(2, 4, 4, 4)
    batch = {"mean": moments, "std": moments + 1, "context": context,
             "text": ["a red circle", "a blue square"], "seed": torch.arange(2)}
    losses = kd_step(batch, pipe, pipe.unet, student, NoiseSchedule.from_config(pipe.scheduler_config),
                     feature_pairs(student.config, pipe.unet.config))
    assert torch.isfinite(losses["loss"]) and losses["feat"] > 0
