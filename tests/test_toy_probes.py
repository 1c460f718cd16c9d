"""The toy probes (minisd/toy/probes.py): the position-word swap mirrors every position and relation phrase of
the caption grammar and nothing else; the shipped teacher pays for swapped position words (it reads them) and
more for another image's caption; the shipped VAE's reconstructions pass the caption check as often as
measured."""

from pathlib import Path

import pytest

from minisd.checkpoints.diffusers import load_vae
from minisd.pipeline import load_pipeline
from minisd.toy.captions import parse_caption
from minisd.toy.dataset import example, heldout_pairs
from minisd.toy.probes import caption_use, mirrored, vae_reconstructions

TEACHER = Path(__file__).resolve().parents[1] / "weights" / "toy-sd"
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "center"}


@pytest.mark.parametrize("text, expected", [
    ("a small red circle on the left side", "a small red circle on the right side"),
    ("near the top, a big white star", "near the bottom, a big white star"),
    ("a red disc to the left of a blue square", "a red disc to the right of a blue square"),
    ("red circle left of blue cross", "red circle right of blue cross"),
    ("a red star on top of a green square, on a grey background", "a red star beneath a green square, "
                                                                  "on a grey background"),
    ("a tiny black cross in the middle", "a tiny black cross in the middle"),
])
def test_mirrored_phrases(text, expected):
    assert mirrored(text) == expected and mirrored(expected) == text


def test_mirrored_captions_mean_the_mirrored_scene():
    """On 300 generated captions: the parser reads the opposite position, or the opposite relation of the
    same two items (i.e. the items in swapped order under the canonical relation)."""
    pairs = heldout_pairs(0, 0.1)
    for i in range(300):
        text = example(0, "train", i, pairs)[1]
        before, after = parse_caption(text), parse_caption(mirrored(text))
        if before.position is not None:
            assert after.position == OPPOSITE[before.position] and after.items == before.items, text
        else:
            assert after.relation == before.relation and after.items == before.items[::-1], text


def test_teacher_reads_position_words(toy_data):
    pipe = load_pipeline(TEACHER)
    rows = caption_use(pipe, toy_data / "train", timesteps=(850,), count=48)
    row = rows[0]
    # measured on these 48 images (45 state a position or relation; torch 2.14.1, CPU): the loss rises by
    # 153% with the position words swapped, 287% with another image's caption, 87% with the empty one (the
    # second toy teacher: 154%, 292%, 91%; the first: 16.8%, 99%, 43%)
    assert row["images"] == sum(mirrored(t) != t for t in captions(toy_data / "train", 48))
    assert row["swapped"] > 0.5 and row["other"] > row["swapped"] and row["empty"] > 0.3, rows


def captions(folder: Path, count: int) -> list[str]:
    import json

    return [json.loads(line)["text"] for line in open(folder / "scenes.jsonl")][:count]


def test_shipped_vae_reconstructions(toy_data, tmp_path):
    scores = vae_reconstructions(load_vae(TEACHER / "vae").float().eval(), toy_data / "train", tmp_path,
                                 count=48, workers=1)
    # measured: 89.6% of these 48 (the first toy teacher's VAE, before its decoder was fine-tuned: 70.8%, its
    # misses shapes)
    assert len(list(tmp_path.glob("*.png"))) == 48
    assert scores["caption_accuracy"] >= 0.8 and scores["accuracy"]["colour"] >= 0.95, scores
