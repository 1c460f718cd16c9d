"""Probes of what a toy model has learnt, cheaper than sampling and scoring it.

`caption_use`: does the U-Net read a caption's position words? Its denoising loss on training images at a few
fixed timesteps, with each image's own caption, with the position and relation words swapped ("left" <->
"right", "above" <->"below", ...; the other words kept), with another image's caption and with the empty one.
A model that places shapes by the words pays for the swap at the noisy timesteps where a scene's layout is
decided; one that ignores them pays nothing, however well it draws colours and shapes. The shipped teacher
pays ~145% at t = 850; teachers trained on SD's schedule paid 0-20% (weights/toy-sd/README.md).

`vae_reconstructions`: how often a VAE's reconstructions of real images pass the caption check, the ceiling of
any U-Net that draws through it.

    python -m minisd.toy probe --model weights/toy-sd --data data/toy/train
    python -m minisd.toy probe --vae weights/toy-sd/vae --data data/toy/heldout
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.schedulers import NoiseSchedule
from minisd.toy.captions import POSITION_WORDS, RELATION_WORDS
from minisd.toy.metric import evaluate_folder

# each phrase and its mirror image, read off the caption tables index by index ("near the top" <-> "near the
# bottom", "over" <-> "under", ...)
OPPOSITES = (("left", "right"), ("top", "bottom"))
MIRROR = {a: b for one, other in OPPOSITES for a, b in zip(POSITION_WORDS[one], POSITION_WORDS[other])}
MIRROR |= {a: b for one, other in (("above", "below"), ("left of", "right of"))
           for a, b in zip(RELATION_WORDS[one], RELATION_WORDS[other])}
MIRROR |= {b: a for a, b in list(MIRROR.items())}
# longest first, whole words: "to the left of" before "left of", "on the left side" before "on the left"
PHRASE = re.compile(r"\b(" + "|".join(map(re.escape, sorted(MIRROR, key=len, reverse=True))) + r")\b",
                    re.IGNORECASE)


def opposite(match: re.Match) -> str:
    phrase = MIRROR[match.group(1).lower()]
    return phrase[0].upper() + phrase[1:] if match.group(1)[0].isupper() else phrase  # "At the right, ..."


def mirrored(text: str) -> str:
    """The caption with every position and relation phrase turned to its opposite."""
    return PHRASE.sub(opposite, text)


def read_split(folder: Path, count: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first `count` images of a split written by `python -m minisd.toy data`, in [-1, 1], [N, 3, H, W];
    their captions; their file names."""
    rows = [json.loads(line) for line in open(folder / "scenes.jsonl")][:count]
    pixels = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB"), np.float32)
                       for r in rows])
    images = torch.from_numpy(pixels / 127.5 - 1).permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W]
    return images, [r["text"] for r in rows], [r["file_name"] for r in rows]


@torch.no_grad()
def caption_use(pipe, folder: str | Path, timesteps: tuple[int, ...] = (961, 850, 700, 500),
                count: int = 256, seed: int = 0) -> list[dict]:
    """Per timestep, the mean denoising loss (the model's own target: noise or velocity) over the images whose
    caption states a position or relation, with their captions and with three other conditionings; one
    draw of latents and noise serves them all. Returns rows of t, loss, and the relative rise of each other
    conditioning: swapped, other, empty."""
    images, captions, _ = read_split(Path(folder), count)
    stated = [i for i, text in enumerate(captions) if mirrored(text) != text]
    images, captions = images[stated], [captions[i] for i in stated]
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.vae.encode(images).sample(generator) * pipe.vae.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    contexts = dict(own=pipe.encode_prompts(captions),
                    swapped=pipe.encode_prompts([mirrored(text) for text in captions]),
                    other=pipe.encode_prompts(captions[1:] + captions[:1]),
                    empty=pipe.encode_prompts([""] * len(captions)))
    rows = []
    for t in timesteps:
        steps = torch.full((len(captions),), t)
        noisy = schedule.add_noise(latents, noise, steps)
        target = noise if schedule.prediction_type == "epsilon" else schedule.velocity(latents, noise, steps)
        loss = {name: (pipe.unet(noisy, steps, context) - target).square().mean().item()
                for name, context in contexts.items()}
        rows.append(dict(t=t, loss=loss["own"], images=len(captions),
                         **{name: loss[name] / loss["own"] - 1 for name in ("swapped", "other", "empty")}))
    return rows


@torch.no_grad()
def vae_reconstructions(vae, folder: str | Path, out: str | Path, count: int = 200, batch: int = 50,
                        workers: int | None = None) -> dict:
    """Encode (posterior mean) and decode the first `count` images of a split into `out`, and score the
    reconstructions against the images' captions (evaluate_folder's dict)."""
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions, names = read_split(folder, count)
    for start in range(0, len(names), batch):
        decoded = vae.decode(vae.encode(images[start:start + batch]).mean).clamp(-1, 1)
        pixels = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # -> [B, H, W, 3]
        for name, image in zip(names[start:start + batch], pixels):
            Image.fromarray(image).save(out / name)
    return evaluate_folder(out, list(zip(names, captions)), real_dir=folder, workers=workers)
