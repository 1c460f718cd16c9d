"""BK-SDM's zero-shot MS-COCO protocol (docs/bksdm.md, "The evaluation protocol"): generate, then score.

Generation: one image per prompt (PNDM, 25 steps, guidance 7.5, 512 px), saved under its file_name in
im512/, and a 256 px copy squashed with PIL's default bicubic resize in im256/, as BK-SDM's script
does. Scores on the im256 copies: FID against real-image statistics (minisd.metrics.fid), the
Inception Score (minisd.metrics.inception_score) and the CLIP score (minisd.metrics.clip_score),
and any other metric the caller passes in (evaluate.py passes the toy world's pixel checker).
Prompts are read by minisd.data.read_metadata.
"""

import csv
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from minisd.images import grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what the scores read (score_files)

SCORE_FOLDER = "im256"  # what the scores read: the protocol scores the 256 px copies


def generate(pipe, rows: list[tuple[str, str]], indices: list[int], folders: dict[Path, int | None], *,
             steps: int, guidance: float, seed: int, seed_mode: str = "per_prompt", size: int | None = None,
             batch_size: int = 1, scheduler: str | None = None, resume: bool = True,
             progress: bool = True, guidance_rescale: float = 0.0) -> tuple[int, float]:
    """Make the images of rows[i] for i in `indices`, each saved as folder/file_name in every folder of
    `folders`, resized there to the folder's size (None: as generated; the protocol's copies are squashed
    with PIL's default bicubic resize). Returns (number made, seconds).

    size: the generated size (default: the model's). resume: skip the rows already in every folder, so an
    interrupted run goes on where it stopped. per_prompt seeds: prompt i uses seed + i, so an image does not
    depend on the batch it ran in or on the GPU count; single: one CPU generator for the whole run, as
    BK-SDM's script (batch 1, from the start).
    """
    todo = [i for i in indices if not (resume and all((folder / rows[i][0]).is_file() for folder in folders))]
    generator = torch.Generator("cpu").manual_seed(seed) if seed_mode == "single" else None
    bar = tqdm(total=len(todo), disable=not progress, desc="generating", unit="img")
    start = time.perf_counter()
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        # per_prompt seeds need consecutive prompts in a batch (seed + first index, then +1 each):
        # else one by one
        groups = ([batch] if generator or batch == list(range(batch[0], batch[0] + len(batch)))
                  else [[i] for i in batch])
        for group in groups:
            images = pipe([rows[i][1] for i in group], steps=steps, guidance=guidance,
                          seed=generator or seed + group[0], seed_mode="per_image", height=size, width=size,
                          scheduler=scheduler, progress=False, guidance_rescale=guidance_rescale)
            for i, image in zip(group, images):
                for folder, copy_size in folders.items():
                    path = folder / rows[i][0]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # Image.resize's default filter is bicubic, as the protocol's
                    (image if copy_size is None else image.resize((copy_size, copy_size))).save(path)
        bar.update(len(batch))
        bar.set_postfix(img_per_s=f"{(b + len(batch)) / (time.perf_counter() - start):.2f}")
    bar.close()
    return len(todo), time.perf_counter() - start


def check_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    """Refuse, naming the line of the prompts file, a row whose image would be written outside the results
    folder (an absolute file_name or one with ..), could not be saved or scored (not .png/.jpg), would
    overwrite another row's, or has a blank prompt (whitespace only: refused, not skipped, so that the
    images stay one per row of the file)."""
    seen = {}
    for i, (name, text) in enumerate(rows):
        inside = os.path.normpath(os.path.join("/out", name))
        problem = None
        if not inside.startswith("/out/"):
            problem = f"file_name {name!r} leaves the results folder; use a relative path inside it"
        elif Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            problem = f"file_name {name!r} is not a .png or .jpg name"
        elif inside in seen:
            problem = (f"file_name {name!r} is also on line {row_lines(path)[seen[inside]]}; "
                       "each row needs its own")
        elif not text.strip():
            problem = "the prompt is blank; write one or remove the row"
        if problem:
            raise ValueError(f"{path}, line {row_lines(path)[i]}: {problem}")
        seen[inside] = i


def row_lines(path: Path) -> list[int]:
    """The line of a prompts file on which each row read_metadata returns starts (a CSV caption may span
    lines)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix == ".jsonl":
            return [n for n, line in enumerate(f, 1) if line.strip()]
        reader, lines = csv.reader(f), []
        next(reader, None)  # the header
        start = reader.line_num + 1
        for row in reader:
            if row:  # csv.DictReader skips empty lines too
                lines.append(start)
            start = reader.line_num + 1
    return lines


def check_metric_weights(metrics: set[str], inception_weights: Path | None, clip_model: str,
                         clip_pretrained: str) -> Path | None:
    """Find (or download) the metric networks' weights before any image is generated, so that a missing file
    costs seconds, not a generation run. Returns the Inception weights' path (None when no metric needs
    it)."""
    from minisd.metrics import inception_weights as inception
    from minisd.metrics import open_clip_weights as open_clip

    if metrics & {"fid", "is"}:
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise FileNotFoundError(f"--inception-weights {inception_weights}: no such file")
        inception_weights = inception_weights or inception.find_weights()
    if "clip" in metrics:
        open_clip.locate(clip_model, clip_pretrained, open_clip.CACHE)
    return inception_weights


def score_files(out: Path, rows: list[tuple[str, str]], folder: str = SCORE_FOLDER) -> list[Path]:
    """The images the scores read, one per prompt; a clear error when the folder and the prompts disagree."""
    files = [out / folder / name for name, _ in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(rows)} images are missing from {out / folder} "
                                f"(first: {missing[0]}); run the generation again to finish them")
    on_disk = sum(1 for p in (out / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if on_disk != len(rows):
        raise ValueError(f"{out / folder} holds {on_disk} images but the prompts ask for {len(rows)}; scores "
                         "would mix in images of other prompts: use the same --num as the generation, or a "
                         "fresh --out")
    # in name order, as pytorch-fid and torch-fidelity read a folder (IS shuffles by position)
    return sorted(files)


def hardware(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def prompt_grid(out: Path, rows: list[tuple[str, str]], n: int = 16, cols: int = 4,
                tile: int = 256) -> Image.Image:
    """The first n images with their prompts written beneath, for a quick look at a run."""
    return captioned_grid([(out / "im512" / name, text) for name, text in rows[:n]], cols, tile)


def captioned_grid(items: list[tuple[Path, str]], cols: int = 4, tile: int = 256) -> Image.Image:
    """Each image file squashed to a tile with its caption written beneath."""
    tiles = []
    for path, text in items:
        with Image.open(path) as image:
            picture = image.convert("RGB").resize((tile, tile))
        card = Image.new("RGB", (tile, tile + 44), "white")
        card.paste(picture, (0, 0))
        draw = ImageDraw.Draw(card)
        words, lines = text.split(), [""]
        for word in words:  # wrap by measured width; two lines at most, the rest elided
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial) <= tile - 8 or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(word)
            else:
                lines[-1] = lines[-1] + " ..."
                break
        draw.multiline_text((4, tile + 4), "\n".join(lines), fill="black", spacing=4)
        tiles.append(card)
    return grid(tiles, cols=min(cols, len(tiles)))


def billions(n: int) -> str:
    """Parameter counts as the paper writes them (0.86B); toy models in millions."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def markdown_row(name: str, scores: dict) -> tuple[str, str]:
    """(header, row) of docs/bksdm.md's results table, | model | FID | IS | CLIP | U-Net params | whole |,
    or of the toy world's, | model | caption accuracy | toy FID | U-Net params | whole |."""
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)
    params = f"{billions(scores['unet_params'])} | {billions(scores['total_params'])} |"
    if "toy" in scores:
        toy = scores["toy"]
        return ("| model | caption accuracy | toy FID | U-Net params | whole |",
                f"| {name} | {cell(toy.get('caption_accuracy'), '.1%')} | {cell(toy.get('toy_fid'), '.3f')} "
                f"| {params}")
    return ("| model | FID | IS | CLIP | U-Net params | whole |",
            f"| {name} | {cell(scores.get('fid'), '.2f')} | {cell(scores.get('is_mean'), '.2f')} | "
            f"{cell(scores.get('clip_score'), '.4f')} | {params}")


def write_scores(out: Path, name: str, scores: dict,
                 table: Callable[[str, dict], tuple[str, str]] = markdown_row) -> str:
    """scores.json and scores.md (the table header and this run's row, or rows); returns the row(s).

    table: (header, row) of the protocol's results table (default: MS-COCO's, or the toy world's).
    """
    scores = {**scores, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "numpy": np.__version__,
                           "python": platform.python_version()}}
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    header, row = table(name, scores)
    (out / "scores.md").write_text(f"{header}\n{'|---' * (header.count('|') - 1)}|\n{row}\n")
    return row


def check_stats(stats: Path, eval_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The real images' (mu, sigma), refused when they are of another size than the scored copies."""
    from minisd.metrics.fid import load_stats

    mu, sigma, meta = load_stats(stats)
    if "size" in meta and int(np.asarray(meta["size"]).ravel()[0]) != eval_size:
        raise ValueError(f"{stats} holds statistics of {int(np.asarray(meta['size']).ravel()[0])} px images "
                         f"but the scores read {eval_size} px copies; rebuild it with --fid-stats-from DIR "
                         f"--eval-size {eval_size}, or pass the matching --eval-size")
    return mu, sigma


def fid_is_scores(files: list[Path], metrics: set[str], stats: Path | None, eval_size: int,
                  weights: Path | None, batch_size: int, device, progress: bool = True) -> dict:
    """FID against real-image statistics and/or the Inception Score, from one read of the images."""
    from minisd.metrics.inception_weights import load_inception
    from minisd.metrics.fid import feature_stats, folder_features, frechet_distance
    from minisd.metrics.inception_score import inception_score

    scores = {}
    if "fid" in metrics:
        mu_real, sigma_real = check_stats(stats, eval_size)
    inception = load_inception(weights, device=device)
    found = folder_features(files, inception, batch_size, device, fid="fid" in metrics, isc="is" in metrics,
                            progress=progress)
    if "fid" in metrics:
        scores["fid"] = frechet_distance(*feature_stats(found.pool), mu_real, sigma_real)
        scores["fid_stats"] = str(stats)
    if "is" in metrics:
        scores["is_mean"], scores["is_std"] = inception_score(found.logits)
    return scores


def parameter_counts(pipe) -> dict:
    """U-Net and whole-model (U-Net + VAE + text encoder) parameters, the paper's last two columns."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    unet = count(pipe.unet)
    return {"unet_params": unet, "total_params": unet + count(pipe.vae) + count(pipe.text_encoder)}


def generation_record(out: Path, made: int, seconds: float, batch_size: int, processes: int, device) -> dict:
    """How fast this run generated; a run that only resumed keeps the record of the run that made the
    images."""
    if made == 0 and (out / "scores.json").is_file():
        return json.loads((out / "scores.json").read_text()).get("generation", {})
    return {"images": made, "seconds": round(seconds, 2),
            "images_per_s_per_process": round(made / max(seconds, 1e-9), 4), "processes": processes,
            "batch_size": batch_size, "hardware": hardware(device)}


def real_stats(folder: Path, save: Path, eval_size: int, weights: Path | None, batch_size: int, device,
               progress: bool = True) -> Path:
    """FID statistics of real images, each squashed to eval_size with PIL's bicubic resize as the protocol
    does."""
    from minisd.metrics.inception_weights import load_inception
    from minisd.metrics.fid import feature_stats, folder_features, image_files, save_stats

    files = image_files(folder)
    found = folder_features(files, load_inception(weights, device=device), batch_size, device, fid=True,
                            progress=progress, resize_to=eval_size)
    return save_stats(save, *feature_stats(found.pool), size=eval_size, num_images=len(files))


def compute_scores(out: Path, rows: list[tuple[str, str]], metrics: set[str], eval_size: int, device, *,
                   fid_stats: Path | None = None, inception_weights: Path | None = None,
                   clip_model: str = "ViT-g-14", clip_pretrained: str = "laion2b_s34b_b88k",
                   batch_size: int = 50,
                   others: dict[str, Callable[[Path, list[tuple[str, str]]], dict]] | None = None,
                   progress: bool = True) -> dict:
    """The chosen metrics over the images of `rows` in out/im256: "fid" (against `fid_stats`), "is", "clip"
    (open_clip's `clip_model` with weights `clip_pretrained`), and each chosen metric of `others`: a
    function of the image folder and the rows, whose result is stored under its name."""
    if not metrics:
        return {}
    files = score_files(out, rows)
    scores = {}
    if metrics & {"fid", "is"}:
        scores.update(fid_is_scores(files, metrics, fid_stats, eval_size, inception_weights, batch_size,
                                    device, progress))
    if "clip" in metrics:
        from minisd.metrics.clip_score import folder_clip_score
        from minisd.metrics.open_clip_weights import load_clip

        model = load_clip(clip_model, clip_pretrained, device=device)
        scores["clip_score"], _ = folder_clip_score(out / SCORE_FOLDER, rows, model, batch_size=batch_size,
                                                    device=device, progress=progress)
        scores["clip_model"] = f"{clip_model} {clip_pretrained}"
    for name, metric in (others or {}).items():
        if name in metrics:
            scores[name] = metric(out / SCORE_FOLDER, rows)
    return scores
