"""DreamBooth's personalization protocol (Ruiz et al., 2023, arXiv 2208.12242, sec. 4.1): generate, score.

One fine-tuned model per subject makes 4 images of each of its 25 prompts (30 x 25 x 4 = 3,000 images), saved
as images/SUBJECT/PP-K.png (prompt PP of the subject's list, image K), with the MS-COCO protocol's generation
loop (minisd.evaluation.generate): per-prompt seeds (row i of all 3,000 uses seed + i), images on disk
skipped, so a run resumes and torchrun slices it. The scores (minisd.metrics.personalization), each a mean
over a subject's images and then over the subjects (each counts once): DINO and CLIP-I against the subject's
real photos, CLIP-T against the prompt without the identifier, and the real-vs-real upper bound of DINO and
CLIP-I. The data set is read by minisd.dreambooth_data.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from minisd import evaluation
from minisd.checkpoints.hub import looks_like_hub_id
from minisd.dreambooth_data import Row, Subject
from minisd.images import IMAGE_SUFFIXES

METRICS = ("dino", "clip")  # clip: CLIP-I and CLIP-T, from one embedding of each image
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}  # the table's columns
IMAGES = "images"  # the folder under --out that the images go to
# DreamBooth's CLIP-I and CLIP-T: the paper does not name its CLIP; OpenAI's ViT-B/32 is the common choice
CLIP_MODEL, CLIP_PRETRAINED = "ViT-B-32-quickgelu", "openai"


def model_sources(pattern: str, subjects: list[Subject]) -> dict[str, str]:
    """Each subject's model: `pattern` with {subject} replaced by its name (a pattern without {subject} is
    one model for all). Every subject needs one that exists here, or a hub id."""
    sources = {s.name: pattern.replace("{subject}", s.name) for s in subjects}
    missing = [name for name, source in sources.items()
               if not (Path(source).exists() or looks_like_hub_id(source))]
    hint = ("" if "{subject}" in pattern
            else "; name each subject's model with {subject}, e.g. runs/db-{subject}")
    if len(missing) == len(sources):
        raise FileNotFoundError(f"--models {pattern} matches no model: {sources[missing[0]]} (subject "
                                f"{missing[0]}) does not exist{hint}")
    if missing:
        raise FileNotFoundError(f"--models {pattern} has no model for {len(missing)} of {len(sources)} "
                                f"subjects ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                                f"{sources[missing[0]]} does not exist; fine-tune those subjects first")
    return sources


def check_metric_weights(metrics: set[str], dino_weights: Path | None, clip_model: str,
                         clip_pretrained: str) -> Path | None:
    """Find (or download) the metric networks' weights before any image is generated. Returns DINO's
    local file or folder (None when DINO is not chosen)."""
    from minisd.metrics import dino_weights as dino
    from minisd.metrics import open_clip_weights as open_clip

    found = None
    if "dino" in metrics:
        if dino_weights is not None and not Path(dino_weights).exists():
            raise FileNotFoundError(f"--dino-weights {dino_weights}: no such file or folder")
        found = dino.locate(dino_weights)
    if "clip" in metrics:
        open_clip.locate(clip_model, clip_pretrained, open_clip.CACHE)
    return found


def image_files(folder: Path, rows: list[Row]) -> list[Path]:
    """The generated image of each row in `folder` (SUBJECT/PP-K with any image suffix); a clear error when
    some are missing, or when the folder holds images that no row asks for."""
    on_disk = {}
    for subject in dict.fromkeys(row.subject for row in rows):
        if (folder / subject).is_dir():
            on_disk.update({f"{subject}/{p.stem}": p for p in sorted((folder / subject).iterdir())
                            if p.suffix.lower() in IMAGE_SUFFIXES})
    wanted = [row.file_name.removesuffix(".png") for row in rows]
    missing = [name for name in wanted if name not in on_disk]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(rows)} images are missing from {folder} (first: "
                                f"{missing[0]}.png); generate them (--models) or name them SUBJECT/PP-K.png "
                                "(prompt PP of the subject's list from 00, image K from 0)")
    stray = sorted(set(on_disk) - set(wanted))
    if stray:
        raise ValueError(f"{folder} holds {len(stray)} images that no prompt asks for (first: {stray[0]}); "
                         "scores would mix them in: use the generation's --images-per-prompt, or a fresh "
                         "--out")
    return [on_disk[name] for name in wanted]


def generate(folder: Path, rows: list[Row], indices: list[int], sources: dict[str, str],
             load: Callable[[str], object], models: dict[str, object] | None = None,
             **settings) -> tuple[int, float]:
    """Make the images of rows[i] for i in `indices` into `folder`, subject by subject, each with its
    subject's model, loaded only where an image is missing. models: the pipelines in memory by source (the
    one evaluate.py loaded for its checks), emptied before another model loads, so that one is in memory at a
    time. settings: minisd.evaluation.generate's. Returns (number made, seconds)."""
    models = {} if models is None else models
    made, seconds = 0, 0.0
    for subject in dict.fromkeys(rows[i].subject for i in indices):
        mine = [i for i in indices if rows[i].subject == subject]
        if all((folder / rows[i].file_name).is_file() for i in mine):
            continue
        source = sources[subject]
        if source not in models:
            models.clear()  # free the last model before the next one loads
            models[source] = load(source)
        n, s = evaluation.generate(models[source], rows, mine, {folder: None}, **settings)
        made, seconds = made + n, seconds + s
    return made, seconds


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove "
                         "it") from None


def compute_scores(files: list[Path], rows: list[Row], subjects: list[Subject], metrics: set[str], device, *,
                   dino_weights: Path | None = None, clip_model: str = CLIP_MODEL,
                   clip_pretrained: str = CLIP_PRETRAINED, batch_size: int = 50,
                   others: dict[str, Callable] | None = None, progress: bool = True) -> dict:
    """The chosen scores of the generated images `files` (one per row): "dino", "clip" (CLIP-I and CLIP-T),
    and each chosen subject score of `others` (a minisd.metrics.personalization.Similarity: images, images ->
    [n, m]), stored under its name as DINO is. Per subject and overall, with the real-vs-real bound."""
    from minisd.metrics import personalization
    from minisd.metrics.dino_weights import load_dino
    from minisd.metrics.open_clip_weights import load_clip

    similarities = {name: fn for name, fn in (others or {}).items() if name in metrics}
    if not similarities and not metrics & set(METRICS):
        return {}
    if "dino" in metrics:
        dino = load_dino(dino_weights, device=device)
        similarities = {"dino": personalization.embedding_similarity(dino, batch_size), **similarities}
    clip = load_clip(clip_model, clip_pretrained, device=device) if "clip" in metrics else None
    per_subject = {}
    for subject in tqdm(subjects, desc="scores", unit="subject", disable=not progress):
        mine = [i for i, row in enumerate(rows) if row.subject == subject.name]
        generated, real = [_open(files[i]) for i in mine], [_open(p) for p in subject.images]
        found, bound = {}, {}
        for name, similarity in similarities.items():
            found[name] = personalization.versus_real(similarity(generated, real)).mean()
            bound[name] = personalization.real_versus_real(similarity(real, real)).mean()
        if clip is not None:
            prompts = [rows[i].clip_prompt for i in mine]
            clip_found = personalization.clip_scores(clip, generated, prompts, real, batch_size)
            found |= {"clip_i": clip_found["clip_i"].mean(), "clip_t": clip_found["clip_t"].mean()}
            bound["clip_i"] = clip_found["clip_i_real"].mean()
        per_subject[subject.name] = {"class": subject.class_name, "live": subject.live, "images": len(mine),
                                     "real_images": len(real), **{k: float(v) for k, v in found.items()},
                                     "real": {k: float(v) for k, v in bound.items()}}
    names = [*similarities, *(("clip_i", "clip_t") if clip is not None else ())]
    out = {name: float(np.mean([s[name] for s in per_subject.values()])) for name in names}
    out["real"] = {name: float(np.mean([s["real"][name] for s in per_subject.values()]))
                   for name in names if name != "clip_t"}
    out["subject_scores"] = list(similarities)
    if clip is not None:
        out["clip_model"] = f"{clip_model} {clip_pretrained}"
    if "dino" in metrics:
        out["dino_weights"] = str(dino_weights)
    return {**out, "subjects": per_subject}


def markdown_rows(name: str, scores: dict) -> tuple[str, str]:
    """(header, rows) of the personalization table, | model | DINO | CLIP-I | CLIP-T | U-Net params |: the
    real-vs-real upper bound, then this model. A plugged-in subject score takes a column after DINO."""
    columns = ["dino", *(s for s in scores.get("subject_scores", []) if s != "dino"), "clip_i", "clip_t"]

    def cells(values: dict) -> str:
        return " | ".join("-" if values.get(c) is None else f"{values[c]:.3f}" for c in columns)
    params = scores.get("unet_params")
    header = f"| model | {' | '.join(LABELS.get(c, c) for c in columns)} | U-Net params |"
    real = f"| real images (upper bound) | {cells(scores.get('real', {}))} | - |"
    model = f"| {name} | {cells(scores)} | {'-' if params is None else evaluation.billions(params)} |"
    return header, f"{real}\n{model}"


def subject_grids(folder: Path, files: list[Path], rows: list[Row], subjects: list[Subject], cols: int = 6,
                  tile: int = 256) -> None:
    """folder/SUBJECT.png: the subject's real photos, then the first image of each prompt, captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        items = [(path, f"real: {path.name}") for path in subject.images]
        items += [(files[i], row.prompt) for i, row in enumerate(rows)
                  if row.subject == subject.name and row.file_name.endswith("-0.png")]
        evaluation.captioned_grid(items, cols, tile).save(folder / f"{subject.name}.png")
