"""DreamBooth's data (Ruiz et al., arXiv 2208.12242): a few photos of one subject, each with the instance
prompt that binds it to a rare identifier ("a sks dog"), and, for prior preservation, images of its class
drawn by the model itself before it learns ("a dog"), trained beside them so that the class keeps its meaning
(against "language drift") and its variety.

The loss is the denoising loss of plain training (minisd/kd_step.py with no teacher U-Net). With prior
preservation each batch holds B instance samples followed by B class samples, and DreamBooth's loss is
    mean over the instance half + prior_loss_weight x mean over the class half.
One forward pass over the 2B samples gives it exactly: kd_step takes a per-sample "loss_weight" and averages
weight x error over the whole batch, so weights of 2 (instance) and 2 x prior_loss_weight (class) make the
mean over 2B samples equal the sum of the two halves' means.
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from minisd.data import ImageFolderDataset, collate
from minisd.images import IMAGE_SUFFIXES, save_with_settings


def image_files(folder: str | Path, flag: str) -> list[str]:
    """The names of the images in `folder` (not its subfolders), sorted; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} is not a folder of images")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not names:
        raise ValueError(f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return names


def prompted_folder(folder: str | Path, prompt: str, flag: str, resolution: int, center_crop: bool,
                    seed: int) -> ImageFolderDataset:
    """Every image of `folder` with one prompt, transformed as DreamBooth's script does: the shorter side
    resized to `resolution`, a center or random crop, no flip."""
    rows = [(name, prompt) for name in image_files(folder, flag)]
    return ImageFolderDataset(folder, resolution, center_crop=center_crop, random_flip=False, seed=seed,
                              rows=rows)


class PriorPreservation(Dataset):
    """Instance and class samples side by side, as DreamBooth's script pairs them: sample i is instance image
    i mod n and class image i mod m, over max(n, m) samples an epoch. Keys are ResumableSampler's (epoch,
    index)."""

    def __init__(self, instance: ImageFolderDataset, prior: ImageFolderDataset):
        self.instance, self.prior = instance, prior
        self.seed = instance.seed  # the sampler's order

    @property
    def skipped(self) -> int:
        return self.instance.skipped + self.prior.skipped

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict | None, dict | None]:
        epoch, index = key
        return (self.instance[epoch, index % len(self.instance)], self.prior[epoch, index % len(self.prior)])


def collate_pairs(pairs: list[tuple[dict | None, dict | None]], prior_loss_weight: float) -> dict | None:
    """A batch of the instance samples, then the class samples (a pair with an unreadable image is dropped
    whole), with each sample's "loss_weight" (see the module's docstring)."""
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    batch = collate([a for a, _ in pairs] + [b for _, b in pairs])
    n = len(pairs)
    batch["loss_weight"] = torch.tensor([2.0] * n + [2.0 * prior_loss_weight] * n)
    return batch


def instance_batches(pairs: list[dict | None]) -> dict | None:
    """Without prior preservation: the instance samples alone (collate's batch)."""
    return collate(pairs)


def make_class_images(load, prompt: str, folder: Path, count: int, seed: int, steps: int, guidance: float,
                      size: int | None, batch_size: int = 4, sampler: str | None = None,
                      progress: bool = True) -> int:
    """Fill `folder` up to `count` images of `prompt` (class-NNNNN.png; images already there count too), and
    return how many were made now. Image i comes from seed + i, and each is written under a temporary name and
    renamed, so an interrupted run leaves no half image and a re-run makes only the missing ones, the same as
    one run would have (up to a pixel level of float rounding where a batch of another size runs other
    kernels). `load()` gives the pipeline, called only when an image is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    todo = [i for i in range(count) if f"class-{i:05d}.png" not in have][:max(0, count - len(have))]
    if not todo:
        return 0
    pipe = load()
    # runs of consecutive indices: with "per_image" seeding (image k of a call from seed + k), image i gets
    # seed + i
    chunks, run = [], []
    for i in todo:
        if run and (i != run[-1] + 1 or len(run) == batch_size):
            chunks, run = chunks + [run], []
        run.append(i)
    for chunk in tqdm(chunks + [run], desc="class images", disable=not progress):
        images = pipe([prompt] * len(chunk), steps=steps, guidance=guidance, seed=seed + chunk[0],
                      seed_mode="per_image", height=size, width=size, scheduler=sampler, progress=False)
        for i, image in zip(chunk, images):
            path = folder / f"class-{i:05d}.png"
            tmp = folder / f".class-{i:05d}.tmp.png"
            save_with_settings(image, tmp, {"prompt": prompt, "seed": str(seed + i), "steps": str(steps),
                                            "guidance": str(guidance)})
            tmp.replace(path)
    return len(todo)
