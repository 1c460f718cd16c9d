"""Image-caption data for BK-SDM's distillation training; samples are {"pixels": [3, R, R] in [-1, 1], "text":
str}.

Two layouts: an image folder with metadata.csv (`file_name,text`) or metadata.jsonl, as BK-SDM's LAION subsets
and diffusers' ImageFolder have it (`ImageFolderDataset`, ordered by `ResumableSampler`), and tar shards as
img2dataset writes them, streamed with tarfile (`TarShardDataset`). The transforms are BK-SDM's
(src/kd_train_text_to_image.py, after diffusers' examples/text_to_image): convert("RGB"), Resize(R, BILINEAR),
CenterCrop(R) or RandomCrop(R), RandomHorizontalFlip(), ToTensor(), Normalize([0.5], [0.5]); their draws are
seeded with (seed, epoch, sample), so a resumed run sees the same flips. Unreadable images are skipped,
counted in `dataset.skipped` and logged once per file.
"""

import csv
import glob
import io
import json
import logging
import math
import multiprocessing
import re
import signal
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from minisd.images import to_rgb

log = logging.getLogger(__name__)

LAYOUTS = """Expected one of:
  - an image folder with metadata.csv (header `file_name,text`) or metadata.jsonl \
(one {"file_name": ..., "text": ...}
    object per line); file_name is relative to the folder;
  - tar shards as img2dataset writes them (00000.jpg + 00000.txt per sample): a folder of *.tar files, \
one .tar file,
    or a pattern such as data/{00000..00099}.tar or data/*.tar."""
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# webdataset: the key ends at the file name's first dot
KEY_AND_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


def preprocess(img: Image.Image, resolution: int, rng: np.random.Generator, center_crop: bool,
               random_flip: bool) -> torch.Tensor:
    """An RGB PIL image -> [3, R, R] in [-1, 1], as torchvision's transforms do it on PIL images."""
    flip = random_flip and rng.random() < 0.5  # RandomHorizontalFlip(p=0.5)
    w, h = img.size  # Resize(R): the shorter side becomes R, the longer int(R * long / short), truncated
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    # torchvision's PIL path is this very call; PIL widens the filter when it shrinks, i.e. it antialiases
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    if center_crop:  # CenterCrop rounds with Python's round(): 1.5 -> 2, 2.5 -> 2
        left, top = round((w - resolution) / 2), round((h - resolution) / 2)
    else:
        left, top = int(rng.integers(w - resolution + 1)), int(rng.integers(h - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)  # ToTensor: [0, 1]
    return x.sub(0.5).div(0.5)  # Normalize(mean 0.5, std 0.5): [-1, 1], the VAE's input range


def sample_seed(*key: int) -> int:
    """A seed for one sample's training noise (timestep, noise, posterior draw), from its key
    (run seed, epoch, position in the data). Tied to the sample, not to a rank or worker, so a
    resumed run and a run on more GPUs draw exactly the same noise for the same sample."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)  # fits an int64


def decode(source, draft: bool = False) -> Image.Image:
    """Opens and fully decodes an image (a path or a file object), so that a corrupt file fails here."""
    with Image.open(source) as img:
        # JPEG only: libjpeg decodes at 1/8 scale, yet reads the whole stream, so truncation still fails
        if draft:
            img.draft("RGB", (1, 1))
        return to_rgb(img)  # 16-bit and transparent images too; loads the pixels


class SkipCounter:
    """Counts skipped samples over all DataLoader workers, and warns once per file and process. Each worker
    has its own copy of the data set, so the count lives in shared memory (inherited by the workers), not in a
    plain int."""

    def __init__(self):
        self.count, self.warned = multiprocessing.Value("q", 0), set()

    def add(self, name: str, reason) -> None:
        with self.count.get_lock():
            self.count.value += 1
        if name not in self.warned:
            self.warned.add(name)
            log.warning("skipping %s: %s", name, reason)


class Strings:
    """Read-only strings as one UTF-8 buffer plus offsets. Forked workers share the parent's pages until
    written, and reading a Python object writes its refcount: a list of millions of captions would be copied
    into every worker (pytorch/pytorch#13246)."""

    def __init__(self, strings: list[str]):
        encoded = [s.encode() for s in strings]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()


def read_metadata(root: str | Path) -> list[tuple[str, str]]:
    """The (file_name, text) rows of root/metadata.csv or root/metadata.jsonl, or of the file `root` itself (a
    prompts file such as evaluate.py's --prompts: JSON lines if its name ends in .jsonl, else CSV)."""
    root = path = Path(root)
    if not root.is_file():
        csv_path, jsonl_path = root / "metadata.csv", root / "metadata.jsonl"
        if csv_path.exists() and jsonl_path.exists():
            raise ValueError(f"{root} holds both metadata.csv and metadata.jsonl; keep one.")
        path = csv_path if csv_path.exists() else jsonl_path
    if path.suffix != ".jsonl":
        # newline="": quoted captions may hold line breaks; utf-8-sig: spreadsheets write a BOM
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, restval="")
            check_columns(path, reader.fieldnames or [])
            rows = [(row["file_name"], row["text"]) for row in reader]
    else:
        with open(path, encoding="utf-8") as f:
            records = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
        for line_no, record in records:
            check_columns(f"{path}, line {line_no}", list(record))
        rows = [(record["file_name"], record["text"]) for _, record in records]
    if not rows:
        raise ValueError(f"{root}: the metadata lists no images.")
    return rows


def check_columns(where, found: list[str]) -> None:
    if missing := [c for c in ("file_name", "text") if c not in found]:
        raise ValueError(f"{where}: found columns {found}, expected file_name and text (missing "
                         f"{missing}).\n{LAYOUTS}")


class ImageFolderDataset(Dataset):
    """An image folder with metadata.csv or metadata.jsonl. Keys are indices, or (epoch, index) from
    ResumableSampler, the epoch varying flips and crops. An unreadable image gives None, which `collate`
    drops. Ranks split it through their samplers (`make_loader`'s rank and world_size), not here."""

    def __init__(self, root: str | Path, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = True, seed: int = 1234, rows: list[tuple[str, str]] | None = None):
        """rows: (file_name, text) pairs to use instead of the folder's metadata (DreamBooth's folders of
        photos, which all take one prompt)."""
        self.root = Path(root)
        names, texts = zip(*(rows if rows is not None else read_metadata(self.root)))
        self.names, self.texts = Strings(names), Strings(texts)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed = seed
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.skips.count.value

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.root / self.names[index]
        try:
            img = decode(path)
        # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError, by codec
        except Exception as err:
            self.skips.add(str(path), err)
            return None
        rng = np.random.default_rng((self.seed, epoch, index))
        return {"pixels": preprocess(img, self.resolution, rng, self.center_crop, self.random_flip),
                "text": self.texts[index], "seed": sample_seed(self.seed, epoch, index)}


class ResumableSampler(Sampler[tuple[int, int]]):
    """This rank's share of a per-epoch permutation, from any position on; yields (epoch, index).

    The order is DistributedSampler's (shuffle=True, drop_last=False): randperm seeded with seed + epoch,
    padded by wrapping to a multiple of world_size, rank r taking every world_size-th index from r, so each
    rank gets ceil(size / world_size) indices, disjoint but for the < world_size padding repeats.
    `set_state(epoch, position)` makes the next pass start there; each pass moves the state on to (epoch + 1,
    0). The loader draws indices ahead of the training loop, so the loop counts the position to save: batches
    taken this epoch * batch_size.
    """

    def __init__(self, size: int, seed: int = 1234, rank: int = 0, world_size: int = 1):
        if size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need size >= 1 and 0 <= rank < world_size; got {size}, {rank}, {world_size}")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.num_samples = math.ceil(size / world_size)
        self.epoch, self.position = 0, 0

    def set_state(self, epoch: int, position: int = 0) -> None:
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position {position} is outside this rank's 0..{self.num_samples}")
        self.epoch, self.position = epoch, position

    def indices(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        pad = self.num_samples * self.world_size - self.size
        order += (order * math.ceil(pad / self.size))[:pad]
        return order[self.rank::self.world_size]

    def __iter__(self):
        epoch, position = self.epoch, self.position
        self.epoch, self.position = epoch + 1, 0
        return ((epoch, i) for i in self.indices(epoch)[position:])

    def __len__(self) -> int:  # of the next pass
        return self.num_samples - self.position


def tar_samples(path: str, skips: SkipCounter):
    """Streams (key, {extension: bytes}) per sample of one tar shard, forward only: nothing is extracted or
    indexed. A sample's files are consecutive (webdataset's convention), so grouping needs only the current
    key. A shard that breaks off is logged and left."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                match = KEY_AND_EXT.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match[1] != key:
                    if files:
                        yield key, files
                    key, files = match[1], {}
                # not img2dataset's .json metadata
                if (ext := match[2].lower()) in IMAGE_EXTS or ext == "txt":
                    files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        skips.add(path, err)
    if files:
        yield key, files


class TarShardDataset(IterableDataset):
    """Tar shards in webdataset layout (img2dataset's output), streamed.

    Each epoch permutes the shards with (seed, epoch); rank r takes every world_size-th shard, and DataLoader
    worker w of W every W-th of those. Samples keep their order within a shard (no shuffle buffer); ranks may
    get different sample counts, as shards differ in size. Flips and crops are seeded with (seed, epoch,
    shard, sample in shard), independent of the numbers of ranks and workers. Each pass (iter(), in each
    worker) is one epoch and moves the state on, as persistent workers hold copies that `set_state` in the
    main process does not reach.
    """

    def __init__(self, shards: list[str], resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = True, seed: int = 1234, rank: int = 0, world_size: int = 1):
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot be split across {world_size} ranks.")
        self.shards = shards
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position, self.batch_size = 0, 0, 1
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.skips.count.value

    def set_state(self, epoch: int, position: int = 0, batch_size: int | None = None) -> None:
        """Start the next pass in epoch `epoch`, after the `position` samples (whole batches) this rank
        consumed in it. The loader takes whole batches from its workers in turn, so its batch_size tells how
        many each worker made. Sample-exact for the same world_size, num_workers and batch_size while every
        worker still has samples (in all but the epoch's last few batches)."""
        if position and (batch_size is None or position % batch_size):
            raise ValueError(f"resuming at {position} needs the loader's batch_size, which must divide it")
        self.epoch, self.position, self.batch_size = epoch, position, batch_size or 1

    def __iter__(self):
        epoch, position = self.epoch, self.position
        self.epoch, self.position = epoch + 1, 0
        info = get_worker_info()
        workers, batches = info.num_workers if info else 1, position // self.batch_size
        # Each pass the loader asks worker 0 first. Resumed after `batches` batches, loader worker j stands in
        # for the worker whose turn it was, (j + batches) % W: its shards, less the batches that it made.
        worker = ((info.id if info else 0) + batches) % workers
        skip = len(range(worker, batches, workers)) * self.batch_size
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
        return self.samples(epoch, order[self.rank::self.world_size][worker::workers].tolist(), skip)

    def samples(self, epoch: int, shard_ids: list[int], skip: int):
        for shard_id in shard_ids:
            path = self.shards[shard_id]
            for index, (key, files) in enumerate(tar_samples(path, self.skips)):
                name, image = f"{path}:{key}", next((files[e] for e in IMAGE_EXTS if e in files), None)
                if image is None or "txt" not in files:
                    self.skips.add(name, "no caption" if image else "no image")
                    continue
                try:  # the samples skipped to resume are decoded too, as a bad one never counted as consumed
                    img = decode(io.BytesIO(image), draft=skip > 0)
                except Exception as err:  # as in ImageFolderDataset
                    self.skips.add(name, err)
                    continue
                if skip:
                    skip -= 1
                    continue
                rng = np.random.default_rng((self.seed, epoch, shard_id, index))
                yield {"pixels": preprocess(img, self.resolution, rng, self.center_crop, self.random_flip),
                       "text": files["txt"].decode(errors="replace"),
                       "seed": sample_seed(self.seed, epoch, shard_id, index)}


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: `a{1..3}` -> a1 a2 a3 (zero padding kept), `{x,y}` -> x y."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    if numbers := re.fullmatch(r"(\d+)\.\.(\d+)", match[1]):
        items = [f"{i:0{len(numbers[1])}d}" for i in range(int(numbers[1]), int(numbers[2]) + 1)]
    else:
        items = match[1].split(",")
    return [path for item in items
            for path in expand_braces(pattern[:match.start()] + item + pattern[match.end():])]


def find_shards(pattern: str) -> list[str]:
    """The .tar files that a brace and/or glob pattern names, in order; every name must exist."""
    shards = []
    for expanded in expand_braces(pattern):
        if not (matches := sorted(glob.glob(expanded))):
            raise FileNotFoundError(f"{expanded} (from {pattern}) does not exist.\n{LAYOUTS}")
        shards += [m for m in matches if m.endswith(".tar")]
    if not shards:
        raise ValueError(f"{pattern} names no .tar files.\n{LAYOUTS}")
    return shards


def open_dataset(path: str, resolution: int = 512, center_crop: bool = True, random_flip: bool = True,
                 seed: int = 1234, rank: int = 0, world_size: int = 1) -> Dataset | IterableDataset:
    """The data at `path`: an image folder (ImageFolderDataset) or tar shards (TarShardDataset). A stream of
    shards takes this rank's share itself (rank, world_size); an image folder is shared out by the sampler of
    its loader, so give make_loader the same rank and world_size."""
    options = {"resolution": resolution, "center_crop": center_crop, "random_flip": random_flip, "seed": seed}
    root, path = Path(path), str(path)
    if root.is_dir():
        if (root / "metadata.csv").exists() or (root / "metadata.jsonl").exists():
            return ImageFolderDataset(root, **options)
        if not (shards := sorted(str(p) for p in root.glob("*.tar"))):
            raise ValueError(f"{path} holds neither metadata.csv/metadata.jsonl nor *.tar files.\n{LAYOUTS}")
    elif root.is_file() or any(c in path for c in "*?[{"):
        shards = find_shards(path)
    else:
        raise FileNotFoundError(f"{path} does not exist.\n{LAYOUTS}")
    return TarShardDataset(shards, **options, rank=rank, world_size=world_size)


def collate(batch: list[dict | None]) -> dict | None:
    """{"pixels": [B, 3, R, R], "text": [B], "seed": [B]} from the samples that loaded; None when none did."""
    if not (batch := [sample for sample in batch if sample is not None]):
        return None
    return {"pixels": torch.stack([s["pixels"] for s in batch]), "text": [s["text"] for s in batch],
            "seed": torch.tensor([s["seed"] for s in batch], dtype=torch.int64)}


def make_loader(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int, pin_memory: bool,
                sampler: Sampler | None = None, drop_last: bool = True, collate_fn=collate, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """A DataLoader with `collate`; a map-style set without a sampler gets a ResumableSampler
    (`loader.sampler`) over this rank's share, in the order of the set's seed (a stream of shards was split
    when opened: see open_dataset). Workers persist across epochs and keep 4 batches each ready, as decoding
    time varies from image to image."""
    if sampler is None and not isinstance(dataset, IterableDataset):
        sampler = ResumableSampler(len(dataset), dataset.seed, rank, world_size)
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=workers, prefetch_factor=4 if workers else None,
                      worker_init_fn=leave_stop_signals if workers else None)


def leave_stop_signals(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM and leave them to the main process, which finishes its step and saves
    (train.py). A terminal's Ctrl-C reaches the whole process group, and Slurm's or systemd's SIGTERM every
    process of the job; a worker that died of it would fail the main process ("DataLoader worker ... is killed
    by signal: Terminated"). The main process still ends its workers: it tells them to stop, and they stop
    when it is gone (a worker hung in a decode outlives the loader's fallback terminate(), until the decode
    returns)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
