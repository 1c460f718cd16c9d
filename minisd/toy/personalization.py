"""DreamBooth in the toy world (Ruiz et al., arXiv 2208.12242): personalize a toy model on a subject it has
never drawn (minisd/toy/subject.py: a large red square checkered with yellow, "a large red sks square") in
six settings of dreambooth.py, all with the same instance images, class images, steps and seed, then measure
what each learnt and what it forgot. docs/personalization.md holds the results.

    run             dreambooth.py
    full            full fine-tuning of the U-Net and text tower, with prior preservation
    full-no-prior   full fine-tuning, without
    lora            LoRA on the U-Net's and text tower's to_q/to_v (BK-SDM's recipe), with prior preservation
    lora-no-prior   LoRA, without
    locon           LoRA on to_q/to_v and on the U-Net's ResBlock convs conv1/conv2 (LoCon), with
    locon-no-prior  LoCon, without

    python -m minisd.toy dreambooth --model weights/toy-sd --out results/toy-dreambooth

Run it from the repository root: each run is a process of dreambooth.py, so that its time and peak memory are
its own. OUT/instance/ holds the 5 instance images, OUT/class_images/ the class images the model draws of the
class prompt (made once, for both runs with prior preservation), OUT/<run>/ each run as dreambooth.py writes
it (re-running skips a finished run). Every model, the one before fine-tuning first, then draws
- subject prompts: held-out captions that put the subject in a stated position or beside another shape,
  which its instance prompt never does ("a big red sks square to the right of a small blue star"); scored on
  how often the subject is drawn (subject.shows_subject) and the rest of the caption is right (the toy
  checker, the subject's pattern painted over);
- class prompts: the same captions without the identifier; scored on caption accuracy (does the class
  still work?) and on how often the subject's pattern shows in them (language drift);
- the instance prompt and the class prompt themselves, the latter the plainest test of drift.
A first row, "rendered", scores the scenes the prompts describe as the world draws them: the upper bound.
OUT/results.json and OUT/results.md hold the table, OUT/grid.png a row of samples per model.
"""

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.dreambooth import make_class_images
from minisd.evaluation import generate
from minisd.images import grid
from minisd.pipeline import load_pipeline, own_sampler
from minisd.toy.ablation import labelled_row
from minisd.toy.checker import check_caption
from minisd.toy.subject import (
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    check_subject_caption,
    instance_images,
    prompts,
    render_subject,
    shows_subject,
    subject_scene,
)
from minisd.toy.world import render

LOCON = ["to_q", "to_v", "conv1", "conv2"]  # BK-SDM's attention layers, and the ResBlocks' 3x3 convs
RUNS = {  # dreambooth.py flags of each run, beyond the shared ones
    "full": [],
    "full-no-prior": ["--no-with-prior-preservation"],
    "lora": ["--lora"],
    "lora-no-prior": ["--lora", "--no-with-prior-preservation"],
    "locon": ["--lora", "--lora-targets", *LOCON],
    "locon-no-prior": ["--lora", "--lora-targets", *LOCON, "--no-with-prior-preservation"],
}
SCRIPT = Path("dreambooth.py")


def fingerprint(model: str | Path) -> str:
    """The first 12 hex digits of a SHA-256 over a model folder's weight files: which weights the figures
    came from, when a folder of the same name is replaced."""
    digest = hashlib.sha256()
    for path in sorted(Path(model).rglob("*.safetensors")):
        digest.update(path.relative_to(model).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def finished(out: Path) -> bool:
    return (out / "timing.json").is_file()


def train(model: Path, out: Path, name: str, steps: int, lr: float, seed: int, class_images: int,
          class_steps: int, guidance: float) -> dict:
    """One run of dreambooth.py in its own process; returns its wall time and peak resident memory (the
    process's largest RSS), also written to OUT/<run>/timing.json."""
    if not SCRIPT.is_file():
        raise FileNotFoundError("the toy DreamBooth runs dreambooth.py: run it from the repository root, "
                                "where dreambooth.py is (python -m minisd.toy dreambooth ...)")
    run = out / name
    argv = [sys.executable, str(SCRIPT), *RUNS[name], "--model", str(model), "--instance-data",
            str(out / "instance"), "--instance-prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT,
            "--class-data", str(out / "class_images"), "--num-class-images", str(class_images),
            "--class-steps", str(class_steps), "--class-guidance", str(guidance), "--resolution", "64",
            "--max-steps", str(steps), "--lr", str(lr), "--seed", str(seed), "--num-workers", "0",
            # at the toy size memory is no concern, and recomputing the forward costs a third of the time
            "--no-gradient-checkpointing", "--log-steps", str(max(1, steps // 10)), "--save-steps",
            str(steps), "--keep", "1", "--out", str(run)]
    start = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)  # the child's own resource use, peak RSS among it
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"dreambooth.py stopped run {name} (exit code {process.returncode}); run the toy "
                           "DreamBooth again to resume")
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    timing = {"seconds": time.perf_counter() - start, "peak_rss_mib": peak / 2**20}
    (run / "timing.json").write_text(json.dumps(timing) + "\n")
    return timing


def personalized(model: Path, out: Path, name: str):
    """The pipeline a run ends with: the run folder (full fine-tuning), or the model with the LoRA merged."""
    if "--lora" in RUNS[name]:
        return load_pipeline(model).load_lora(out / name)
    return load_pipeline(out / name)


def prompt_sets(rows: list[tuple], repeats: int) -> dict[str, list[str]]:
    """What every model draws: the instance prompt and the class prompt `repeats` times each, and the subject
    prompts and class prompts of `rows`."""
    return {"instance": [INSTANCE_PROMPT] * repeats, "class_prompt": [CLASS_PROMPT] * repeats,
            "subject": [text for _, text, _ in rows], "class": [text for _, _, text in rows]}


def measure(images: dict[str, list], sets: dict[str, list[str]]) -> dict[str, float]:
    """The table's shares, from the images of each prompt set."""
    named = [check_subject_caption(image, text) for image, text in zip(images["subject"], sets["subject"])]
    share = lambda values: sum(values) / len(values)  # noqa: E731
    return {"instance_subject": share([shows_subject(image) for image in images["instance"]]),
            "subject": share([v["subject"] for v in named]),
            "subject_and_caption": share([v["subject_and_caption"] for v in named]),
            "caption_with_subject": share([v["caption_correct"] for v in named]),
            "class_prompt_subject": share([shows_subject(image) for image in images["class_prompt"]]),
            "class_caption": share([check_caption(image, text)["caption_correct"]
                                    for image, text in zip(images["class"], sets["class"])]),
            "class_subject": share([shows_subject(image) for image in images["class"]])}


def score(pipe, folder: Path, sets: dict[str, list[str]], seed: int, sample_steps: int,
          guidance: float) -> dict:
    """Draw every prompt of `sets` into folder/<set>/NNN.png (prompt i from seed + i, the same for every
    model) and measure them."""
    seconds = 0.0
    for kind, texts in sets.items():
        kind_rows = [(f"{i:03d}.png", text) for i, text in enumerate(texts)]
        seconds += generate(pipe, kind_rows, list(range(len(texts))), {folder / kind: None},
                            steps=sample_steps, guidance=guidance, seed=seed, batch_size=16, resume=False,
                            progress=False)[1]
    images = {kind: [Image.open(folder / kind / f"{i:03d}.png") for i in range(len(texts))]
              for kind, texts in sets.items()}
    return measure(images, sets) | {"s_per_image": seconds / sum(map(len, sets.values()))}


def rendered(rows: list[tuple], repeats: int, seed: int) -> dict[str, list]:
    """The images the prompts describe, as the world renders them: the upper bound of every share (the
    instance prompt and class prompt by the instance images and plain squares of the same scenes)."""
    centred = [subject_scene(np.random.default_rng((seed, 9, i)), 1, "center") for i in range(repeats)]
    return {"instance": [render_subject(scene) for scene in centred],
            "class_prompt": [render(scene) for scene in centred],
            "subject": [render_subject(scene) for scene, _, _ in rows],
            "class": [render(scene) for scene, _, _ in rows]}


def run_toy_dreambooth(model: Path, out: Path, steps: int, lr: float, lora_lr: float, seed: int,
                       num_prompts: int, repeats: int, class_images: int, sample_steps: int, guidance: float,
                       runs: tuple[str, ...] = tuple(RUNS), grid_prompts: int = 4) -> dict:
    """Writes the instance and class images, trains the `runs`, then draws and scores the model before and
    after each. Returns what results.json holds."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "instance").mkdir(exist_ok=True)
    for i, image in enumerate(instance_images(seed)):
        image.save(out / "instance" / f"{i:02d}.png")
    before = time.perf_counter()
    # as dreambooth.py would make them (its seed, steps and guidance), made here once and timed apart
    make_class_images(lambda: load_pipeline(model), CLASS_PROMPT, out / "class_images", class_images, seed,
                      sample_steps, guidance, 64, progress=False)
    class_seconds = time.perf_counter() - before

    timings = {}
    for name in runs:
        run_lr = lora_lr if "--lora" in RUNS[name] else lr
        timings[name] = (json.loads((out / name / "timing.json").read_text()) if finished(out / name) else
                         train(model, out, name, steps, run_lr, seed, class_images, sample_steps, guidance))

    rows = prompts(seed, num_prompts)
    sets = prompt_sets(rows, repeats)
    columns = (("instance", 2), ("subject", grid_prompts), ("class_prompt", 2), ("class", grid_prompts))
    real = rendered(rows, repeats, seed)
    table = [{"model": "rendered", "prior": None, **measure(real, sets)}]
    sheets = [labelled_row([real[kind][i] for kind, n in columns for i in range(n)], "rendered")]
    for name in ("before", *runs):
        pipe = load_pipeline(model) if name == "before" else personalized(model, out, name)
        scores = score(pipe, out / name, sets, seed, sample_steps, guidance)
        table.append({"model": name, "prior": None if name == "before" else "no-prior" not in name,
                      **timings.get(name, {}), **scores})
        sheets.append(labelled_row([Image.open(out / name / kind / f"{i:03d}.png") for kind, n in columns
                                    for i in range(n)], name))
    grid(sheets, cols=1).save(out / "grid.png")
    results = {"model": str(model), "fingerprint": fingerprint(model),
               "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": steps,
               "lr": lr, "lora_lr": lora_lr, "seed": seed, "prompts": num_prompts, "repeats": repeats,
               "class_images": class_images, "sample_steps": sample_steps, "sampler": own_sampler(model),
               "guidance": guidance,
               "class_images_seconds": class_seconds,
               "grid_prompts": [text for _, text, _ in rows[:grid_prompts]],
               "seconds": time.perf_counter() - start, "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


COLUMNS = (  # (heading, key): the subject drawn, the rest of its caption right, the class kept
    ("instance prompt: subject", "instance_subject"),
    ("new contexts: subject", "subject"),
    ("new contexts: rest of caption", "caption_with_subject"),
    ("class prompt: subject (drift)", "class_prompt_subject"),
    ("class, new contexts: caption acc.", "class_caption"),
    ("class, new contexts: subject (drift)", "class_subject"),
)


def markdown(results: dict) -> str:
    headings = ("model", "prior pres.", *(heading for heading, _ in COLUMNS), "train time", "peak RSS")
    head = "| " + " | ".join(headings) + " |\n|---|---" + "|---:" * (len(headings) - 2) + "|\n"
    lines = []
    for r in results["table"]:
        prior = "-" if r["prior"] is None else ("yes" if r["prior"] else "no")
        timing = ([f"{r['seconds']:.0f} s", f"{r['peak_rss_mib']:.0f} MiB"] if "seconds" in r else ["-", "-"])
        cells = [r["model"], prior, *(f"{r[key]:.1%}" if key in r else "-" for _, key in COLUMNS), *timing]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{results['model']} (weights {results['fingerprint']}), {results['date']}: {results['steps']} "
            f"steps, lr {results['lr']:g} (full) / {results['lora_lr']:g} (LoRA), seed {results['seed']}, "
            f"{results['class_images']} class images; the instance and class prompts drawn "
            f"{results['repeats']} times each, {results['prompts']} new contexts with and without the "
            f"identifier; {results['sample_steps']} {results['sampler'].upper()} steps, guidance "
            f"{results['guidance']:g}; torch "
            f"{results['torch']}; {results['seconds'] / 60:.1f} min in all.\n")
    return head + "\n".join(lines) + "\n" + note
