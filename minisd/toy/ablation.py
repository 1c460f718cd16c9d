"""BK-SDM's distillation ablation in miniature (Kim et al., arXiv 2305.15798: teacher init, output KD and
feature KD, each taken away in turn): students of the toy teacher, all trained with train.py for the same
steps, data, batch and seed, then sampled and scored alike. docs/toy-ablation.md holds the results.

    run            student   init      loss
    base           base      teacher   denoising + output KD + feature KD (BK-SDM)
    small          small     teacher   denoising + output KD + feature KD
    tiny           tiny      teacher   denoising + output KD + feature KD
    tiny-out-kd    tiny      teacher   denoising + output KD
    tiny-no-kd     tiny      teacher   denoising only
    tiny-random    tiny      random    denoising only (the paper's first row: no teacher at all)

    python -m minisd.toy ablation --teacher weights/toy-sd --data data/toy --out results/toy-ablation

Run it from the repository root: each run calls train.py's main() with the run's flags, in this process.
Each run lands in OUT/<run>/ as train.py writes it (re-running resumes, a finished run is skipped), with its
images for the held-out prompts in OUT/<run>/images/. OUT/results.json and OUT/results.md hold the table, and
OUT/grid.png one row per model (the teacher first, then the runs in the order above) for the same prompts
and seeds.
"""

import importlib
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from minisd.checkpoints.diffusers import unet_config_from_table, write_json
from minisd.data import read_metadata
from minisd.evaluation import generate
from minisd.images import grid
from minisd.pipeline import load_pipeline, own_sampler
from minisd.table import variant
from minisd.toy.metric import evaluate_folder
from minisd.unet import count_params

RUNS = {  # train.py flags of each run, beyond the shared ones
    "base": ["--variant", "base"],
    "small": ["--variant", "small"],
    "tiny": ["--variant", "tiny"],
    "tiny-out-kd": ["--variant", "tiny", "--lambda-feat", "0"],
    "tiny-no-kd": ["--variant", "tiny", "--plain"],
    "tiny-random": ["--variant", "tiny", "--plain", "--unet-config", "{tiny_config}"],
}


def train_script(name: str = "train"):
    """train.py (or another training script at the repository root), imported as a module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ModuleNotFoundError(f"the toy world's experiments run {name}.py's main(): run them from the "
                                  f"repository root, where {name}.py is (python -m minisd.toy ...)") from None


def train(teacher: Path, data: Path, out: Path, name: str, steps: int, batch: int, lr: float,
          seed: int) -> Path:
    """One run of train.py; returns its last checkpoint, a whole pipeline folder."""
    flags = [f.format(tiny_config=out / "tiny-unet.json") for f in RUNS[name]]
    argv = [*flags, "--teacher", str(teacher), "--data", str(data / "train"), "--out", str(out / name),
            "--resolution", "64", "--no-flip", "--batch-size", str(batch), "--global-batch", str(batch),
            "--max-steps", str(steps), "--lr", str(lr), "--caption-dropout", "0.1", "--seed", str(seed),
            "--num-workers", "1", "--save-steps", str(max(1, steps // 4)), "--keep", "1", "--valid-steps",
            "0", "--log-steps", "25"]
    status, checkpoint = train_script().main(argv), out / name / f"checkpoint-{steps:07d}"
    if status or not checkpoint.is_dir():  # stopped early: on Ctrl-C train.py saves where it is and returns
        raise RuntimeError(f"train.py stopped run {name} before step {steps}; run the ablation again to "
                           "resume")
    return checkpoint


def labelled_row(images: list[Image.Image], label: str, scale: int = 2) -> Image.Image:
    """The images side by side, scaled up (nearest: the pixels as the checker sees them), with a label on the
    left."""
    row = grid([im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images],
               cols=len(images))
    sheet = Image.new("RGB", (row.width + 110, row.height), "white")
    sheet.paste(row, (110, 0))
    ImageDraw.Draw(sheet).text((6, row.height // 2 - 6), label, fill="black")
    return sheet


def run_ablation(teacher: Path, data: Path, out: Path, steps: int, batch: int, lr: float, seed: int,
                 prompts: int, sample_steps: int, guidance: float, grid_prompts: int = 8) -> list[dict]:
    """Trains the RUNS, then samples and scores the teacher and each student on the first `prompts` held-out
    captions. Returns the table's rows."""
    out.mkdir(parents=True, exist_ok=True)
    teacher_unet = load_pipeline(teacher).unet.config
    write_json(out / "tiny-unet.json", unet_config_from_table(variant(teacher_unet, "tiny")))
    models = {"teacher": teacher}
    for name in RUNS:
        models[name] = train(teacher, data, out, name, steps, batch, lr, seed)

    rows = read_metadata(data / "heldout" / "metadata.csv")[:prompts]
    table, sheets = [], []
    for name, source in models.items():
        pipe = load_pipeline(source)
        # image i from seed + i; every image made again (resume=False), so that s/image times this model
        _, seconds = generate(pipe, rows, list(range(len(rows))), {out / name / "images": None},
                              steps=sample_steps, guidance=guidance, seed=seed, batch_size=16, resume=False,
                              progress=False)
        scores = evaluate_folder(out / name / "images", rows, real_dir=data / "heldout")
        log = out / name / "log.jsonl"
        last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
        table.append({"model": name, "params": count_params(pipe.unet.config)["total"],
                      "s_per_image": seconds / len(rows),
                      **{k: last[k] for k in ("sd", "out", "feat") if k in last}, **scores})
        sheets.append(labelled_row([Image.open(out / name / "images" / f) for f, _ in rows[:grid_prompts]],
                                   name))
        del pipe
    (out / "results.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "results.md").write_text(markdown(table, steps, batch, prompts, sample_steps, guidance,
                                             own_sampler(teacher)))
    grid(sheets, cols=1).save(out / "grid.png")
    return table


def markdown(table: list[dict], steps: int, batch: int, prompts: int, sample_steps: int,
             guidance: float, sampler: str) -> str:
    columns = ("model", "U-Net params", "caption acc.", "colour", "shape", "size", "count", "position",
               "relation", "toy FID", "s/image (CPU)", "final L_sd", "L_out", "L_feat")
    head = "| " + " | ".join(columns) + " |\n|---" + "|---:" * (len(columns) - 1) + "|\n"
    lines = []
    for r in table:
        acc = r["accuracy"]
        cells = [r["model"], f"{r['params']:,}", f"{r['caption_accuracy']:.1%}",
                 *(f"{acc[k]:.1%}" if k in acc else "-"
                   for k in ("colour", "shape", "size", "count", "position",
                                                                     "relation")),
                 f"{r['toy_fid']:.2f}", f"{r['s_per_image']:.2f}",
                 *(f"{r[k]:.4f}" if k in r else "-" for k in ("sd", "out", "feat"))]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{steps} steps of batch {batch} per student; {prompts} held-out prompts, {sample_steps} "
            f"{sampler.upper()} steps, guidance {guidance}, seed i for prompt i; torch {torch.__version__}.\n")
    return head + "\n".join(lines) + "\n" + note
