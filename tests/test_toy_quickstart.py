"""The toy world's offline quick start (docs/toy-world.md), at test size: write toy data, sample from the
shipped teacher, distill a tiny student from it, and evaluate the student on held-out prompts (the toy metric,
chosen by itself for toy prompts); then the ablation command end to end at a few steps. What each step writes
is checked, and evaluate.py's toy scores must equal a recomputation by the metric over the same files."""

import json
from pathlib import Path

import pytest
from PIL import Image

import sample
import train
from evaluate import main as evaluate
from minisd.data import read_metadata
from minisd.toy.ablation import RUNS, run_ablation
from minisd.toy.metric import evaluate_folder

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "weights" / "toy-sd"


@pytest.mark.slow
def test_quick_start(toy_data, tmp_path):
    out = tmp_path / "toy.png"
    assert sample.main(["a red circle above a blue square", "--model", str(TEACHER), "--guidance", "4",
                        "--steps", "5", "--num-images", "2", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(tmp_path / "toy-00.png").size == (64, 64) and (tmp_path / "toy-grid.png").is_file()

    assert train.main(["--variant", "tiny", "--teacher", str(TEACHER), "--data", str(toy_data / "train"),
                       "--out", str(tmp_path / "toy-tiny"), "--resolution", "64", "--no-flip", "--batch-size",
                       "4", "--global-batch", "4", "--max-steps", "3", "--lr", "5e-4", "--caption-dropout",
                       "0.1", "--num-workers", "0", "--save-steps", "3", "--valid-steps", "0"]) == 0
    student = tmp_path / "toy-tiny" / "checkpoint-0000003"

    metadata = toy_data / "heldout" / "metadata.csv"
    results = tmp_path / "results"
    assert evaluate(["--model", str(student), "--prompts", str(metadata), "--out", str(results), "--num", "6",
                     "--guidance", "4", "--steps", "5", "--batch-size", "3", "--name", "toy-tiny",
                     "--no-progress"]) == 0
    scores = json.loads((results / "scores.json").read_text())
    rows = read_metadata(metadata)[:6]
    assert Image.open(results / "im256" / rows[0][0]).size == (64, 64)  # scored at the toy world's own size
    expected = evaluate_folder(results / "im256", rows, real_dir=toy_data / "heldout", workers=1)
    assert scores["num_images"] == 6 and scores["guidance"] == 4
    assert scores["toy"].keys() == expected.keys()
    assert scores["toy"]["accuracy"] == expected["accuracy"]
    assert scores["toy"]["caption_accuracy"] == expected["caption_accuracy"]
    assert scores["toy"]["toy_fid"] == pytest.approx(expected["toy_fid"], rel=1e-9)
    row = (results / "scores.md").read_text().splitlines()[-1]
    assert row.startswith(f"| toy-tiny | {expected['caption_accuracy']:.1%} | {expected['toy_fid']:.3f} "
                          "|"), row


@pytest.mark.slow  # six train.py processes
def test_ablation_command(toy_data, tmp_path):
    table = run_ablation(TEACHER, toy_data, tmp_path / "ablation", steps=2, batch=4, lr=5e-4, seed=0,
                         prompts=4, sample_steps=2, guidance=4.0)
    assert [r["model"] for r in table] == ["teacher", *RUNS]
    for name in RUNS:
        log = [json.loads(line) for line in open(tmp_path / "ablation" / name / "log.jsonl")]
        assert log[-1]["step"] == 2, name
    by_name = {r["model"]: r for r in table}
    assert (by_name["tiny"]["params"] < by_name["small"]["params"] < by_name["base"]["params"]
            < by_name["teacher"]["params"])
    # --plain trains on the denoising loss alone
    assert by_name["tiny-no-kd"]["out"] == 0 and by_name["tiny"]["out"] > 0
    assert all(r["images"] == 4 and "toy_fid" in r for r in table)
    lines = (tmp_path / "ablation" / "results.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in lines) == 1 + len(table)  # the header and a row per model
    assert Image.open(tmp_path / "ablation" / "grid.png").height > 7 * 64
