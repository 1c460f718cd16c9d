"""minisd.data on a small generated data set in each layout: an image folder with metadata.csv or
metadata.jsonl, and img2dataset-style tar shards. Checks the samples, torchvision's resize/crop arithmetic,
seeded flips, skipped corrupt files, the per-rank sampler and its resumption, and the sharded tar stream
across ranks, workers and a resume."""

import csv
import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data.distributed import DistributedSampler

from minisd.data import (
    ImageFolderDataset,
    ResumableSampler,
    TarShardDataset,
    collate,
    make_loader,
    open_dataset,
    preprocess,
)

R = 32  # the test resolution
CAPTIONS = ['a red fox, "jumping" over a fence', "café ☕ 東京, naïve 'quotes'",
            "two lines,\nwith a comma",
            '"fully quoted"', "emoji 🦊, commas, and more, commas", "plain caption"]
# (w, h): landscape, portrait, square, extremes
SIZES = [(64, 48), (48, 80), (90, 90), (33, 97), (120, 40), (40, 41)]
FORMATS = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGBA"), ("webp", "WEBP", "RGB"), ("jpeg", "JPEG", "L"),
           ("png", "PNG", "P"), ("jpg", "JPEG", "RGB")]


def image_bytes(i: int, size=(48, 48), fmt="JPEG", mode="RGB") -> bytes:
    img = Image.new("RGB", size, (40 * i % 256, 90, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, size[0] // 3, size[1] - 1), fill=(250, 20 * i % 256, 10))  # left band: flips show
    draw.ellipse((size[0] // 2, size[1] // 4, size[0] - 1, size[1] // 2), fill=(0, 255, 0))
    buffer = io.BytesIO()
    img.convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def samples(n: int = 6):
    """(file name, image bytes, caption) for n samples of varied sizes, formats and modes."""
    return [(f"{i:05d}.{FORMATS[i % 6][0]}", image_bytes(i, SIZES[i % 6], *FORMATS[i % 6][1:]),
             CAPTIONS[i % 6] if n <= 6 else f"caption {i}, #{i}") for i in range(n)]


def write_folder(root, rows, metadata="csv"):
    for name, data, _ in rows:
        if data is not None:
            (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / name).write_bytes(data)
    if metadata == "csv":
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("file_name", "text")] + [(f"images/{n}", text) for n, _, text in rows])
    else:
        lines = [json.dumps({"file_name": f"images/{n}", "text": text}) + "\n" for n, _, text in rows]
        (root / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    return root


def write_shards(root, rows, per_shard):
    """Tar shards as img2dataset writes them: key.jpg, key.txt and key.json per sample."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(0, len(rows), per_shard):
        with tarfile.open(root / f"{shard // per_shard:05d}.tar", "w") as tar:
            for i, (name, data, text) in enumerate(rows[shard:shard + per_shard]):
                key, ext = f"{shard // per_shard:05d}{i:04d}", name.split(".")[1]
                meta = json.dumps({"caption": text}).encode()
                for member, payload in ((f"{key}.{ext}", data), (f"{key}.txt", text.encode()),
                                        (f"{key}.json", meta)):
                    if payload is not None:
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return root


def everything(dataset) -> list[dict]:
    items = (dataset[i] for i in range(len(dataset))) if isinstance(dataset, ImageFolderDataset) else dataset
    return [s for s in items if s is not None]


@pytest.mark.parametrize("layout", ["csv", "jsonl", "tar"])
def test_samples_in_every_layout(tmp_path, layout):
    rows = samples()
    path = write_shards(tmp_path, rows, 2) if layout == "tar" else write_folder(tmp_path, rows, layout)
    dataset = open_dataset(str(path), resolution=R)
    assert isinstance(dataset, TarShardDataset if layout == "tar" else ImageFolderDataset)
    got = everything(dataset)
    assert Counter(s["text"] for s in got) == Counter(CAPTIONS)
    for s in got:
        assert s["pixels"].shape == (3, R, R) and s["pixels"].dtype == torch.float32
        assert -1 <= s["pixels"].min() and s["pixels"].max() <= 1
    assert dataset.skipped == 0


def test_resize_and_crop_follow_torchvision():
    rng = np.random.default_rng(0)
    # 35 x 32: the short side is already R, so no resampling; CenterCrop's left = round(3 / 2) = 2, not 3 // 2
    # = 1
    columns = np.tile(np.arange(35, dtype=np.uint8)[None, :, None] * 7, (32, 1, 3))
    x = preprocess(Image.fromarray(columns), R, rng, center_crop=True, random_flip=False)
    expected = torch.from_numpy(columns[:, 2:34]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(x, expected, atol=1e-6)
    # Resize(32): 50 x 30 -> int(32 * 50 / 30) = 53 x 32, bilinear; CenterCrop's left = round(21 / 2) = 10
    noise = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for img, box in [(Image.fromarray(noise), (10, 0)), (Image.fromarray(noise.transpose(1, 0, 2)), (0, 10))]:
        w, h = (53, 32) if img.width > img.height else (32, 53)
        resized = np.array(img.resize((w, h), Image.BILINEAR).crop((*box, box[0] + R, box[1] + R)))
        expected = torch.from_numpy(resized).permute(2, 0, 1).float() / 255 * 2 - 1
        assert torch.allclose(preprocess(img, R, rng, True, False), expected, atol=1e-6)


def test_flips_and_crops_are_seeded(tmp_path):
    write_folder(tmp_path, samples())
    plain = ImageFolderDataset(tmp_path, resolution=R, random_flip=False)
    flipping, again = (ImageFolderDataset(tmp_path, resolution=R) for _ in range(2))
    flips = []
    for epoch in range(8):
        for i in range(len(plain)):
            x = flipping[epoch, i]["pixels"]
            # the same seed, epoch and index: the same sample
            assert torch.equal(x, again[epoch, i]["pixels"])
            flipped = torch.equal(x, plain[i]["pixels"].flip(-1))
            assert flipped or torch.equal(x, plain[i]["pixels"])
            flips.append(flipped)
    assert 0.3 < np.mean(flips) < 0.7  # p = 0.5, varying with the epoch
    other = ImageFolderDataset(tmp_path, resolution=R, seed=99)
    assert any(not torch.equal(other[e, i]["pixels"],
                               flipping[e, i]["pixels"]) for e in range(8) for i in range(6))
    cropping = ImageFolderDataset(tmp_path, resolution=R, center_crop=False)
    assert torch.equal(cropping[3, 4]["pixels"], cropping[3, 4]["pixels"])
    assert any(not torch.equal(cropping[e, 4]["pixels"], cropping[0, 4]["pixels"]) for e in range(1, 8))

    stream = open_dataset(str(write_shards(tmp_path / "tar", samples(), 2)), resolution=R)
    stream.set_state(1)
    first = [s["pixels"] for s in stream]
    stream.set_state(1)
    assert all(torch.equal(a, b["pixels"]) for a, b in zip(first, stream, strict=True))


def corrupt_rows():
    rows = samples()
    jpeg = image_bytes(7)
    return rows + [("bad/truncated.jpg", jpeg[:len(jpeg) // 2], "truncated"),
                   ("bad/noise.jpg", np.random.default_rng(0).bytes(500), "not an image"),
                   ("bad/missing.jpg", None, "listed, never written")]


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    write_folder(tmp_path, corrupt_rows())
    dataset = open_dataset(str(tmp_path), resolution=R)
    with caplog.at_level(logging.WARNING, logger="minisd.data"):
        assert [dataset[i] is None for i in range(len(dataset))] == [False] * 6 + [True] * 3
        assert dataset[len(dataset) - 1] is None  # skipped and counted again, but warned about once
    assert dataset.skipped == 4
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and all(any(n in m for m in warned) for n in ("truncated", "noise", "missing"))

    fresh = open_dataset(str(tmp_path), resolution=R)  # the count reaches the main process from the workers
    batches = list(make_loader(fresh, batch_size=4, num_workers=2, pin_memory=False, drop_last=False))
    assert Counter(t for b in batches if b is not None for t in b["text"]) == Counter(CAPTIONS)
    assert fresh.skipped == 3
    assert collate([None, None]) is None


def test_unreadable_tar_samples_are_skipped_and_counted(tmp_path):
    rows = corrupt_rows()[:-1] + [("00009.jpg", None, "a caption without its image")]
    stream = open_dataset(str(write_shards(tmp_path, rows, 3)), resolution=R)
    assert Counter(s["text"] for s in stream) == Counter(CAPTIONS)
    assert stream.skipped == 3


def test_make_loader_batches(tmp_path):
    write_folder(tmp_path, samples())
    loader = make_loader(open_dataset(str(tmp_path), resolution=R), batch_size=4, num_workers=0,
                         pin_memory=False)
    assert isinstance(loader.sampler, ResumableSampler)
    (batch,) = list(loader)  # 6 samples, drop_last: one batch of 4
    assert batch["pixels"].shape == (4, 3, R, R) and len(batch["text"]) == 4
    # two ranks: each loader's sampler takes its half of the folder
    halves = [[t for b in make_loader(open_dataset(str(tmp_path), resolution=R), batch_size=1, num_workers=0,
                                      pin_memory=False, rank=rank,
                                      world_size=2) for t in b["text"]] for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 3 and Counter(halves[0] + halves[1]) == Counter(CAPTIONS)


@pytest.mark.parametrize("size", [10, 11])
def test_sampler_splits_each_epoch_across_ranks(size):
    for epoch in range(3):
        slices = []
        for rank in range(2):
            sampler = ResumableSampler(size, seed=5, rank=rank, world_size=2)
            sampler.set_state(epoch)
            slices.append([i for e, i in sampler if e == epoch])
            reference = DistributedSampler(range(size), num_replicas=2, rank=rank, shuffle=True, seed=5)
            reference.set_epoch(epoch)
            assert slices[-1] == list(reference)  # DistributedSampler's order, padding included
        assert len(slices[0]) == len(slices[1]) == -(-size // 2)
        counts = Counter(slices[0] + slices[1])
        # every index, each once but for one padding repeat of an odd size
        assert set(counts) == set(range(size))
        assert sum(counts.values()) - size == size % 2
    assert ResumableSampler(10, seed=5).indices(0) != ResumableSampler(10, seed=5).indices(1)


def test_sampler_resumes_at_the_next_sample():
    full = ResumableSampler(23, rank=1, world_size=2)
    full.set_state(4)
    epoch4 = list(full)
    assert next(iter(full))[0] == 5  # each pass moves the state on to the next epoch
    for k in (0, 1, 7, 12):
        resumed = ResumableSampler(23, rank=1, world_size=2)
        resumed.set_state(4, k)
        assert len(resumed) == 12 - k and list(resumed) == epoch4[k:]
        assert [e for e, _ in resumed] == [5] * 12


def stream_texts(stream, num_workers, batch_size=2):
    loader = make_loader(stream, batch_size=batch_size, num_workers=num_workers, pin_memory=False,
                         drop_last=False)
    return [t for batch in loader for t in batch["text"]]


def test_tar_stream_yields_each_sample_once_across_ranks_and_workers(tmp_path):
    rows = samples(30)
    path = str(write_shards(tmp_path, rows, 5)) + "/{00000..00005}.tar"
    texts = stream_texts(open_dataset(path, resolution=16), num_workers=2)
    assert sorted(texts) == sorted(text for _, _, text in rows)
    per_rank = [stream_texts(open_dataset(path, resolution=16, rank=r, world_size=2), 2) for r in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(text for _, _, text in rows)


def test_tar_stream_resumes_at_the_next_sample(tmp_path):
    path = str(write_shards(tmp_path, samples(48), 6))  # 8 shards, 2 per worker and rank
    for rank in range(2):
        stream = open_dataset(path, resolution=16, rank=rank, world_size=2)
        stream.set_state(3)
        epoch3 = stream_texts(stream, num_workers=2, batch_size=3)
        for consumed in (3, 6, 9, 15):
            stream = open_dataset(path, resolution=16, rank=rank, world_size=2)
            stream.set_state(3, consumed, batch_size=3)
            assert stream_texts(stream, num_workers=2, batch_size=3) == epoch3[consumed:]


def test_tar_stream_passes_are_epochs(tmp_path):
    path = str(write_shards(tmp_path, samples(48), 6))
    loader = make_loader(open_dataset(path, resolution=16), batch_size=3, num_workers=2, pin_memory=False)
    passes = [[t for batch in loader for t in batch["text"]] for _ in range(2)]  # the same persistent workers
    epoch1 = open_dataset(path, resolution=16)
    epoch1.set_state(1)
    assert passes[1] == stream_texts(epoch1, num_workers=2, batch_size=3) != passes[0]


def test_bad_layouts_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist(.|\n)*metadata.csv"):
        open_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000.jpg").write_bytes(image_bytes(0))
    with pytest.raises(ValueError, match="neither metadata.csv/metadata.jsonl nor \\*.tar(.|\n)*img2dataset"):
        open_dataset(str(tmp_path / "empty"))
    (tmp_path / "cols").mkdir()
    (tmp_path / "cols" / "metadata.csv").write_text("image,caption\na.jpg,a cat\n")
    with pytest.raises(ValueError,
                       match=r"found columns \['image', 'caption'\], expected file_name and text"):
        open_dataset(str(tmp_path / "cols"))
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "a"}\n{"file_name": '
                                                      '"b.jpg"}\n')
    with pytest.raises(ValueError, match=r"line 2: found columns \['file_name'\](.|\n)*missing \['text'\]"):
        open_dataset(str(tmp_path / "keys"))
    write_shards(tmp_path / "tar", samples(), 2)
    assert len(open_dataset(str(tmp_path / "tar") + "/{00000..00002}.tar").shards) == 3
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        open_dataset(str(tmp_path / "tar") + "/{00000..00003}.tar")
    with pytest.raises(ValueError, match="3 shards cannot be split across 4 ranks"):
        open_dataset(str(tmp_path / "tar"), world_size=4, rank=1)
