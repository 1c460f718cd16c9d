"""The few-step chain in the toy world (docs/few-step.md, "The toy world's few-step table"): a BK-SDM-Tiny
student of the toy teacher, made a latent consistency model (LCM, arXiv 2310.04378) with train_lcm.py, and
sampled in 1, 2, 4 and 8 steps beside the student and the teacher with 25 steps of the teacher's own sampler
(its scheduler/ folder's: DDIM with trailing spacing for toy-sd's zero terminal SNR schedule, PNDM for SD's)
and guidance.

    python -m minisd.toy lcm --teacher weights/toy-sd --data data/toy --out results/toy-lcm
    python -m minisd.toy lcm --student results/toy-ablation/tiny/checkpoint-0000250 --out results/toy-lcm

Run it from the repository root: it calls train.py's and train_lcm.py's main() with the toy's flags, in this
process, as the ablation does (minisd/toy/ablation.py). The runs, each in OUT/<run>/ as its script writes it
(re-running resumes; a finished run is reused):
- tiny: the ablation's `tiny` run (train.py, output and feature KD from the teacher), unless `student` names
  one made already;
- tiny-lcm: full LCD of it (a guidance embedding, an EMA target) on the teacher's trajectories: the teacher
  takes the guided solver steps (train_lcm.py --student);
- tiny-lcm-self (unless `self_lcm` is off): full LCD of it on its own trajectories, the student as its own
  solver, as train_lcm.py distills any one model;
- tiny-lcm-lora: LCM-LoRA of it, sampled with guidance 1 (no CFG pass);
- teacher-lcm (on request): full LCD of the teacher itself.
Every table row draws the same first `prompts` held-out captions (prompt i from seed i) into
OUT/images/<row>/. OUT/results.json and OUT/results.md hold the table and the times, OUT/grid.png the first 8
prompts of each row.
"""

import json
import math
import os
import time
from pathlib import Path

import torch
from PIL import Image

from minisd.data import read_metadata
from minisd.evaluation import generate
from minisd.images import grid
from minisd.pipeline import load_pipeline, own_sampler
from minisd.toy.ablation import labelled_row, train, train_script
from minisd.toy.metric import ATTRIBUTES, evaluate_folder
from minisd.unet import count_params

LCM_STEPS = (1, 2, 4, 8)
# The toy's LCD recipe: train_lcm.py's flags beyond its defaults. The toy models sample at guidance 4
# (configs.TOY_GUIDANCE), w = 3: the full form draws w around it rather than in SD's [3, 15]; the LoRA form,
# with no w input, learns w = 3 alone. The learning rates are the real-size defaults' 100x and 10x, for runs
# of a few hundred steps.
FORMS = {
    "lcm": ["--w-min", "1", "--w-max", "5", "--lr", "1e-4"],
    "lcm-lora": ["--lora", "--rank", "16", "--alpha", "16", "--w-min", "3", "--w-max", "3", "--lr", "1e-3"],
}
RESULTS = {"lcm": "model_index.json", "lcm-lora": "pytorch_lora_weights.safetensors"}  # a finished run's


def clock() -> tuple[float, float]:
    """Wall and CPU time now; the CPU time of this process and of its finished children (the data loader's
    workers)."""
    return time.perf_counter(), sum(os.times()[:4])


def since(start: tuple[float, float]) -> dict:
    now = clock()
    return {"wall": now[0] - start[0], "cpu": now[1] - start[1]}


def lcm_distill(teacher: Path, data: Path, out: Path, form: str, steps: int, batch: int, seed: int,
                student: Path | None = None) -> Path:
    """One run of train_lcm.py on the toy data; returns its result: the pipeline folder (full LCD) or the LoRA
    file (LCM-LoRA). student: the model that learns, on the teacher's trajectories (default: the teacher)."""
    argv = [*FORMS[form], "--teacher", str(teacher), "--data", str(data / "train"), "--out", str(out),
            *(["--student", str(student)] if student else []),
            "--resolution", "64", "--no-flip", "--batch-size", str(batch), "--global-batch", str(batch),
            "--max-steps", str(steps), "--seed", str(seed), "--num-workers", "1", "--save-steps",
            str(max(1, steps // 2)), "--keep", "1", "--valid-steps", "0", "--log-steps", "25"]
    result, last = out / RESULTS[form], out / f"checkpoint-{steps:07d}"
    if not (result.is_file() and last.is_dir()):  # else finished before
        status = train_script("train_lcm").main(argv)
        # a stopped run that goes on from a shorter finished one still holds that one's result: the last
        # checkpoint tells
        if status or not (result.is_file() and last.is_dir()):
            raise RuntimeError(f"train_lcm.py stopped run {out.name} before step {steps}; run the command "
                               "again to resume")
    return out if form == "lcm" else result


def sampled_rows(teacher_lcm: bool, lora: bool, guidance: float, sampler: str,
                 self_lcm: bool = True) -> list[dict]:
    """The table's rows: which model, sampled how. The teacher and the student with 25 steps of `sampler` (the
    teacher's own, pipeline.own_sampler) and CFG, as the toy models are sampled everywhere else; both in as few
    U-Net calls as the LCMs (CFG doubles each step's calls: 2 steps make the 4 calls of an LCM's 4 steps), and
    the student with the LCM sampler alone (CFG, no distillation), to show what the distillation adds; then the
    LCMs."""
    rows = [dict(model="teacher", scheduler=sampler, steps=25, guidance=guidance),
            dict(model="teacher", scheduler=sampler, steps=2, guidance=guidance),
            dict(model="tiny", scheduler=sampler, steps=25, guidance=guidance),
            *(dict(model="tiny", scheduler=sampler, steps=s, guidance=guidance) for s in (4, 2, 1)),
            dict(model="tiny", scheduler="lcm", steps=4, guidance=guidance),
            *(dict(model="tiny-lcm", scheduler="lcm", steps=s, guidance=guidance) for s in LCM_STEPS)]
    if self_lcm:
        rows += [dict(model="tiny-lcm-self", scheduler="lcm", steps=4, guidance=guidance)]
    if lora:  # guidance distilled in, without a w input: sampled without CFG
        rows += [dict(model="tiny-lcm-lora", scheduler="lcm", steps=s, guidance=1.0) for s in LCM_STEPS]
    if teacher_lcm:
        rows += [dict(model="teacher-lcm", scheduler="lcm", steps=4, guidance=guidance)]
    for row in rows:
        cfg = row["guidance"] > 1 and row["model"] in ("teacher", "tiny")  # an LCM takes w as an input
        row.update(name=f"{row['model']} {row['scheduler']}-{row['steps']}",
                   unet_calls=row["steps"] * (2 if cfg else 1))
    return rows


def run_lcm(teacher: Path, data: Path, out: Path, student: Path | None = None, student_steps: int = 250,
            student_lr: float = 5e-4, lcd_steps: int = 400, batch: int = 32, seed: int = 0,
            prompts: int = 100, guidance: float = 4.0, lora: bool = True, teacher_lcm: bool = False,
            grid_prompts: int = 8, workers: int = 1, self_lcm: bool = True) -> list[dict]:
    """Makes the runs (module docstring), then samples and scores each of sampled_rows() on the first
    `prompts` held-out captions. Returns the table's rows. workers: the toy metric's processes (1: this one,
    which for a few hundred images is quicker than starting new ones that each import torch)."""
    out.mkdir(parents=True, exist_ok=True)
    seconds, begin = {}, clock()  # wall and CPU seconds of each part
    if student is None:
        student = train(teacher, data, out, "tiny", student_steps, batch, student_lr, seed)
        seconds["tiny"] = since(begin)
    models = {"teacher": (teacher, None), "tiny": (student, None)}
    # (run, solver teacher, learning model or None for the teacher itself, form)
    runs = [("tiny-lcm", teacher, student, "lcm")] + [("tiny-lcm-self", student, None, "lcm")] * self_lcm + \
        [("tiny-lcm-lora", student, None, "lcm-lora")] * lora + \
        [("teacher-lcm", teacher, None, "lcm")] * teacher_lcm
    for name, solver, learner, form in runs:
        start = clock()
        result = lcm_distill(solver, data, out / name, form, lcd_steps, batch, seed, learner)
        models[name] = (result, None) if form == "lcm" else (solver, result)  # an LCM-LoRA goes on its base
        seconds[name] = since(start)

    start = clock()
    captions = read_metadata(data / "heldout" / "metadata.csv")[:prompts]
    sampler = own_sampler(teacher)
    table, sheets, rows = [], [], sampled_rows(teacher_lcm, lora, guidance, sampler, self_lcm)
    for row, pipe in zip(rows, pipelines(rows, models)):
        folder = out / "images" / row["name"].replace(" ", "-")
        # image i from seed + i; every image made again (resume=False), so that s/image times this model
        _, took = generate(pipe, captions, list(range(len(captions))), {folder: None}, steps=row["steps"],
                           guidance=row["guidance"], seed=seed, scheduler=row["scheduler"], batch_size=16,
                           resume=False, progress=False)
        scores = evaluate_folder(folder, captions, real_dir=data / "heldout", workers=workers)
        table.append({**row, "params": count_params(pipe.unet.config)["total"],
                      "s_per_image": took / len(captions), **scores})
        sheets.append(labelled_row([Image.open(folder / f) for f, _ in captions[:grid_prompts]], row["name"]))
    seconds["sampling and scoring"], seconds["all"] = since(start), since(begin)

    student_25 = next(r for r in table if r["name"] == f"tiny {sampler}-25")["caption_accuracy"]
    for r in table:  # the goal: 4-step LCM within 80% of this
        r["of_student"] = r["caption_accuracy"] / student_25 if student_25 else math.nan
    record = {"rows": table, "seconds": seconds, "student": str(student), "lcd_steps": lcd_steps,
              "batch": batch, "forms": FORMS, "prompts": prompts, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "results.md").write_text(markdown(record))
    grid(sheets, cols=1).save(out / "grid.png")
    return table


def pipelines(rows: list[dict], models: dict):
    """The pipeline of each row, loaded once for consecutive rows of one model. models: name -> (pipeline
    source, LoRA file or None)."""
    loaded, pipe = None, None
    for row in rows:
        if row["model"] != loaded:
            source, lora_file = models[row["model"]]
            pipe, loaded = load_pipeline(source), row["model"]
            if lora_file is not None:
                pipe.load_lora(lora_file)
        yield pipe


def markdown(record: dict) -> str:
    columns = ("model", "sampler", "steps", "U-Net calls", "caption acc.", "of 25-step student", *ATTRIBUTES,
               "toy FID", "s/image (CPU)")
    head = "| " + " | ".join(columns) + " |\n|---|---|" + "---:|" * (len(columns) - 2) + "\n"
    lines = []
    for r in record["rows"]:
        acc = r["accuracy"]
        cells = [r["model"], r["scheduler"].upper(), str(r["steps"]), str(r["unet_calls"]),
                 f"{r['caption_accuracy']:.1%}",
                 "-" if math.isnan(r["of_student"]) else f"{r['of_student']:.0%}",
                 *(f"{acc[k]:.1%}" if k in acc else "-" for k in ATTRIBUTES), f"{r['toy_fid']:.2f}",
                 f"{r['s_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    times = ", ".join(f"{k} {v['wall'] / 60:.1f} min ({v['cpu'] / 60:.1f} CPU)"
                      for k, v in record["seconds"].items())
    note = (f"\n{record['prompts']} held-out prompts, seed i for prompt i. LCD: {record['lcd_steps']} steps "
            f"of batch {record['batch']}. Wall time (CPU time): {times}. torch {record['torch']}, "
            f"{record['threads']} thread(s).\n")
    return head + "\n".join(lines) + "\n" + note
