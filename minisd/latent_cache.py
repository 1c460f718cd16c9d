"""train.py --cache-latents DIR: each image's VAE posterior and each caption's text states, computed once.

BK-SDM's loop (and train.py without a cache) runs the VAE encoder on every image and CLIP on every
caption at every step: for BK-Small at 512 px a third of a KD sample's compute (3.47 TFLOP with the
encode online, 2.35 without; python -m minisd.flops). Over repeated epochs that work repeats. A cache
does it once per data set.

It keeps each image's posterior moments (mean and std), not one latent sample, so every training
sample still draws its own posterior sample from its per-sample seed (minisd/kd_step.py's
per_sample_noise): a run from the cache gives the losses of a run from the images with --no-flip (to
float rounding), resumes exactly, and trains on N GPUs as on one. The image transform is fixed when
caching: center crop at the resolution, no flip (a flipped image has other latents). Captions are
read from the data folder's metadata at training time, so caption dropout still works: a dropped
caption gets the empty prompt's states.

DIR holds
    cache.json                 what was cached: data folder, resolution, sample count, shard size, dtype,
    teacher shard-00000.safetensors    rows [k * shard_size, (k + 1) * shard_size) of the data set, in
    metadata order:
                               mean, std [n, 4, h, w]; context [n, 77, D]; valid [n] (0: the image failed to
                               load)
Shards are written under a temporary name and renamed, so a shard on disk is whole, and a re-run skips
finished shards (resumable). Under torchrun, rank r writes shards r, r + world, ...; then every rank
reads all of them. Image folders (metadata.csv/jsonl) only; tar shards are streamed and not cached.
"""

import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minisd.checkpoints.files import read_json, write_json, write_state_dict
from minisd.data import ImageFolderDataset, SkipCounter, Strings, read_metadata, sample_seed

SHARD_SIZE = 1024  # samples per shard: 64 MB of bf16 moments and 240 MB of SD-v1 text states at 512 px


def shard_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.safetensors"


def as_list(samples: list) -> list:
    """DataLoader collate that keeps None (an image that failed to load) in its place."""
    return samples


def check_manifest(cache: Path, manifest: dict) -> None:
    """Write cache.json, or check that the one there describes the same cache."""
    path = cache / "cache.json"
    if path.is_file():
        found = read_json(path)
        if found != manifest:
            diff = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} now"
                             for k, v in manifest.items() if found.get(k) != v)
            raise ValueError(f"--cache-latents {cache} holds another cache ({diff}); give another folder, or "
                             "delete it")
    else:
        write_json(path, manifest)


@torch.no_grad()
def build(teacher, data: str | Path, cache: str | Path, resolution: int, batch_size: int = 64,
          num_workers: int = 4, rank: int = 0, world_size: int = 1, teacher_name: str = "",
          shard_size: int = SHARD_SIZE) -> list[int]:
    """Cache the moments and text states of the image folder `data` under `cache` (a Pipeline `teacher`
    gives the VAE and text encoder, in their training dtype); returns the shards this rank wrote."""
    root, cache = Path(data), Path(cache)
    if not (root / "metadata.csv").is_file() and not (root / "metadata.jsonl").is_file():
        raise ValueError(f"--cache-latents needs an image folder with metadata.csv or metadata.jsonl; {data} "
                         "is not one (tar shards are streamed, not cached): drop --cache-latents for this "
                         "data")
    images = ImageFolderDataset(root, resolution, center_crop=True, random_flip=False)
    n = len(images)
    check_manifest(cache,
                   dict(data=str(root.resolve()), resolution=resolution, samples=n, shard_size=shard_size,
                               dtype=str(teacher.vae_dtype).removeprefix("torch."), teacher=teacher_name))
    todo = [k for k in range(rank, math.ceil(n / shard_size),
                             world_size) if not shard_path(cache, k).is_file()]
    # batches never straddle two shards, so a shard is written as soon as its last batch is encoded
    batches, shard_of = [], []
    for k in todo:
        rows = range(k * shard_size, min(n, (k + 1) * shard_size))
        batches += [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        shard_of += [k] * math.ceil(len(rows) / batch_size)
    loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers, collate_fn=as_list,
                        pin_memory=teacher.device.type == "cuda")
    parts = []
    for i, samples in enumerate(tqdm(loader, desc=f"caching latents in {cache}",
                                     disable=rank != 0 or not batches)):
        parts.append(encode(teacher, samples, resolution))
        if i + 1 == len(batches) or shard_of[i + 1] != shard_of[i]:
            write_state_dict(shard_path(cache, shard_of[i]),
                             {key: torch.cat([p[key] for p in parts]) for key in parts[0]})
            parts = []
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk before any rank reads them
    return todo


def encode(teacher, samples: list[dict | None], resolution: int) -> dict[str, torch.Tensor]:
    """One batch of ImageFolderDataset samples (None where an image failed) -> its cache rows, on the CPU."""
    ok = [s for s in samples if s is not None]
    valid = torch.tensor([s is not None for s in samples], dtype=torch.uint8)
    latent = (teacher.vae.config.latent_channels, *[resolution // teacher.vae_scale] * 2)
    text_dtype = next(teacher.text_encoder.parameters()).dtype
    rows = {"mean": torch.zeros(len(samples), *latent, dtype=teacher.vae_dtype),
            "std": torch.zeros(len(samples), *latent, dtype=teacher.vae_dtype),
            "context": torch.zeros(len(samples), teacher.tokenizer.max_length,
                                   teacher.text_encoder.config.width, dtype=text_dtype)}
    if ok:
        posterior = teacher.vae.encode(torch.stack([s["pixels"]
                                                    for s in ok]).to(teacher.device, teacher.vae_dtype))
        context = teacher.text_encoder(teacher.tokenizer([s["text"] for s in ok]).to(teacher.device))
        for key, value in (("mean", posterior.mean), ("std", posterior.std), ("context", context)):
            rows[key][valid.bool()] = value.cpu()
    return rows | {"valid": valid}


class CachedDataset(Dataset):
    """The cache as a map-style data set: keys and seeds as ImageFolderDataset's (index in metadata
    order, or (epoch, index) from ResumableSampler), so the same sample gets the same noise. A sample
    whose image failed when cached gives None, counted in `skipped`, as the image folder would."""

    def __init__(self, cache: str | Path, data: str | Path, seed: int = 1234):
        self.cache = Path(cache)
        manifest = read_json(self.cache / "cache.json")
        self.samples, self.shard_size = manifest["samples"], manifest["shard_size"]
        missing = [shard_path(self.cache, k).name for k in range(math.ceil(self.samples / self.shard_size))
                   if not shard_path(self.cache, k).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.cache} lacks {', '.join(missing)}: run train.py --cache-latents "
                                    "again to finish the cache")
        texts = [text for _, text in read_metadata(Path(data))]
        if len(texts) != self.samples:
            raise ValueError(f"{data} lists {len(texts)} images but {self.cache} cached {self.samples}; give "
                             "the folder it was built from, or another --cache-latents folder")
        self.texts = Strings(texts)
        self.seed = seed
        self.skips, self.files = SkipCounter(), {}

    @property
    def skipped(self) -> int:
        return self.skips.count.value

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        k, row = divmod(index, self.shard_size)
        if k not in self.files:  # opened lazily, so each DataLoader worker maps the shards itself
            self.files[k] = safe_open(str(shard_path(self.cache, k)), framework="pt")
        f = self.files[k]
        if not f.get_slice("valid")[row:row + 1][0]:
            self.skips.add(f"{self.cache} row {index}", "its image failed to load when cached")
            return None
        return {**{key: f.get_slice(key)[row:row + 1][0] for key in ("mean", "std", "context")},
                "text": self.texts[index], "seed": sample_seed(self.seed, epoch, index)}


def collate(batch: list[dict | None]) -> dict | None:
    """minisd.data.collate for cached samples: stacked mean, std and context; texts and seeds."""
    if not (batch := [sample for sample in batch if sample is not None]):
        return None
    stacked = {key: torch.stack([s[key] for s in batch]) for key in ("mean", "std", "context")}
    return stacked | {"text": [s["text"] for s in batch],
                      "seed": torch.tensor([s["seed"] for s in batch], dtype=torch.int64)}


def posterior_moments(batch: dict, teacher, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of each sample's VAE posterior, in the VAE's dtype: from the cache, or by encoding
    batch["pixels"]."""
    if "mean" in batch:
        return (batch["mean"].to(device, teacher.vae_dtype, non_blocking=True),
                batch["std"].to(device, teacher.vae_dtype, non_blocking=True))
    posterior = teacher.vae.encode(batch["pixels"].to(device, non_blocking=True).to(teacher.vae_dtype))
    return posterior.mean, posterior.std


def cached_text_states(batch: dict, texts: list[str], teacher, device) -> torch.Tensor:
    """The cached text states [B, 77, D] in the teacher's dtype; where caption dropout emptied a caption, the
    empty prompt's."""
    # a cache written in another precision (an fp32 run on the CPU, say) must still feed the teacher what its
    # own text encoder would: a bf16 U-Net refuses fp32 keys and values
    context = batch["context"].to(device, teacher.dtype, non_blocking=True)
    dropped = [i for i, text in enumerate(texts) if text == "" and batch["text"][i] != ""]
    if dropped:
        empty = teacher.text_encoder(teacher.tokenizer([""]).to(device)).to(context.dtype)
        context[dropped] = empty
    return context
