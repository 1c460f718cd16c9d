"""A short BK-SDM distillation from the shipped toy teacher (weights/toy-sd) on the CPU: a tiny student,
initialised from the teacher, learns to match it. The criterion is the KD losses, not caption accuracy: a few
hundred steps move a student's samples too little, and too unevenly across seeds, for an accuracy bound to be
both tight and reliable, while both KD terms fall steadily (see docs/toy-ablation.md for the numbers)."""

import json
from pathlib import Path

import pytest
import train
from minisd.toy.dataset import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "weights" / "toy-sd"
STEPS = 150
# The last logged window's mean (steps 126-150) over the first's (steps 1-25), measured with torch 2.14.1 on
# the CPU: output KD 0.35, feature KD 0.15. Bounds 1.7x and 2x above. (The second toy teacher: 0.36 and 0.10;
# the first: 0.17 and 0.30.)
MAX_RATIO = {"out": 0.6, "feat": 0.3}


@pytest.mark.slow  # 150 KD steps from the toy teacher
def test_short_kd_run_lowers_kd_losses(tmp_path):
    write_dataset(tmp_path / "toy", n=512, seed=1, heldout=0.0, workers=1)
    assert train.main(["--variant", "tiny", "--teacher", str(TEACHER), "--data",
                       str(tmp_path / "toy" / "train"), "--out", str(tmp_path / "run"), "--resolution", "64",
                       "--no-flip", "--batch-size", "8", "--global-batch", "8", "--max-steps", str(STEPS),
                       "--lr", "5e-4", "--caption-dropout", "0.1", "--num-workers", "0", "--log-steps", "25",
                       "--save-steps", str(STEPS), "--valid-steps", "0"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert rows[-1]["step"] == STEPS
    for term, bound in MAX_RATIO.items():
        assert rows[-1][term] < bound * rows[0][term], (term, [round(r[term], 4) for r in rows])
