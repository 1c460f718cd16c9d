"""The toy world's DreamBooth (minisd/toy/subject.py, minisd/toy/personalization.py): the subject check tells
the subject from plain shapes on rendered images and on the toy VAE's reconstructions, with margins; the
captions name the subject as the instance prompt does; `python -m minisd.toy dreambooth` runs end to end at a
few steps and writes its table, JSON and grid; and bounds on what the shipped teacher does before and after
DreamBooth, as tests/test_toy_teacher.py bounds the teacher."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minisd.pipeline import load_pipeline
from minisd.toy.__main__ import main as toy_main
from minisd.toy.captions import parse_caption
from minisd.toy.checker import check_caption
from minisd.toy.personalization import COLUMNS, RUNS, markdown, run_toy_dreambooth
from minisd.toy.subject import (
    CLASS_PROMPT,
    IDENTIFIER,
    INSTANCE_PROMPT,
    MIN_SCORE,
    PATTERN,
    SUBJECT,
    check_subject_caption,
    instance_images,
    prompts,
    render_subject,
    subject_scene,
    subject_score,
    without_identifier,
)
from minisd.toy.world import EXTENTS, POSITIONS, Attributes, Item, Scene, render

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "weights" / "toy-sd"
SCENES = 100


@pytest.fixture(scope="module")
def rows():
    return prompts(0, SCENES)


def test_subject_scores_one_and_plain_squares_zero(rows):
    """Measured on these 100 scenes: the subject 0.92-1.00, the same scene with a plain red square 0.00."""
    subject = [subject_score(render_subject(scene)) for scene, _, _ in rows]
    plain = [subject_score(render(scene)) for scene, _, _ in rows]
    assert min(subject) >= 0.85 and max(np.abs(plain)) <= 0.05, (min(subject), max(np.abs(plain)))


def test_subject_score_tells_other_patterns_apart():
    """The checker of the other phase scores -1; a red square beside a yellow one (3 px apart, as the world
    draws two shapes at the least) is two objects, not a checker; an image with no red scores 0."""
    scene = subject_scene(np.random.default_rng(0), 1, "center")
    mirrored = np.asarray(render_subject(scene))[:, ::-1]  # the checker of the other phase
    assert subject_score(render_subject(scene)) >= 0.85 and subject_score(mirrored) <= -0.85
    pair = Scene(Attributes((SUBJECT, Item(PATTERN, "square", "large")), relation="left of"),
                 ((18.0, 32.0), (46.0, 32.0)), (25.0, 25.0), "grey", "plain", 0)
    assert abs(subject_score(render(pair))) <= 0.05
    assert subject_score(Image.new("RGB", (64, 64), (128, 128, 128))) == 0.0


def test_caption_check_sees_through_the_pattern(rows):
    """On rendered subjects, the rest of every caption is judged right once the pattern is painted over (the
    plain checker, which sees two colours, judges none right); plain squares pass the ordinary check and never
    show the subject."""
    named = [check_subject_caption(render_subject(scene), text) for scene, text, _ in rows]
    assert all(v["subject_and_caption"] for v in named)
    assert not any(check_caption(render_subject(scene), plain)["caption_correct"] for scene, _, plain in rows)
    for scene, _, plain in rows:
        image = render(scene)
        assert check_caption(image, plain)["caption_correct"] and subject_score(image) < MIN_SCORE


@pytest.mark.slow  # 27 s: 300 images through the toy VAE
def test_vae_keeps_the_subject(rows):
    """The toy VAE's reconstructions cap what a model can draw. Measured on these 100 scenes with the shipped
    teacher's VAE (its decoder fine-tuned): 100% of large subjects still pass the check (82% with the rest of
    the caption), no plain square does, and the same subjects drawn small (12-16 px) pass 86%: the subject is
    large so that a model need not draw fine texture at a few latent pixels. (The first toy teacher's decoder
    kept 96%, 66% and 38%.) The bounds sit about 3 standard errors below."""
    vae = load_pipeline(TEACHER).vae

    def reconstruct(images):
        x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
                         for im in images])
        with torch.no_grad():
            y = vae.decode(vae.encode(x.to(next(vae.parameters()).dtype)).mean).float()
        return [((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy() for im in y]

    large = reconstruct([render_subject(scene) for scene, _, _ in rows])
    plain = reconstruct([render(scene) for scene, _, _ in rows])
    assert np.mean([subject_score(im) >= MIN_SCORE for im in large]) >= 0.95
    assert np.mean([check_subject_caption(im, text)["subject_and_caption"]
                    for im, (_, text, _) in zip(large, rows)]) >= 0.7
    assert not any(subject_score(im) >= MIN_SCORE for im in plain)
    rng = np.random.default_rng(0)
    small = [Scene(scene.attributes, scene.centres, tuple(float(rng.uniform(*EXTENTS["small"]))
                                                          for _ in scene.extents),
                   scene.background, scene.texture, scene.texture_seed) for scene, _, _ in rows]
    assert np.mean([subject_score(im) >= MIN_SCORE for im in reconstruct(map(render_subject, small))]) >= 0.75


def test_instance_images_and_prompts(rows):
    """The instance images show what the instance prompt states; the held-out contexts are new: the subject
    alone at every other position, or beside another shape (never red or yellow)."""
    images = instance_images(0)
    assert len(images) == 5 and len({im.tobytes() for im in images}) == 5
    assert all(im.size == (64, 64) and check_subject_caption(im, INSTANCE_PROMPT)["subject_and_caption"]
               for im in images)
    assert parse_caption(CLASS_PROMPT) == Attributes((SUBJECT,), position="center")
    assert without_identifier(INSTANCE_PROMPT) == CLASS_PROMPT
    for scene, text, plain in rows:
        assert text.lower().count(f" {IDENTIFIER} ") == 1 and without_identifier(text) == plain
        assert parse_caption(plain) == scene.attributes
    alone = [scene for scene, _, _ in rows if scene.attributes.position]
    assert len(alone) == SCENES // 2
    assert {s.attributes.position for s in alone} == set(POSITIONS) - {"center"}
    others = [item for scene, _, _ in rows for item in scene.attributes.items if item != SUBJECT]
    assert len(others) == SCENES // 2 and not {item.colour for item in others} & {SUBJECT.colour, PATTERN}


def test_markdown_table():
    row = dict(instance_subject=1.0, subject=0.5, caption_with_subject=0.25, class_prompt_subject=0.0,
               class_caption=0.4, class_subject=0.125)
    results = dict(model="weights/toy-sd", fingerprint="0123456789ab", date="2026-12-02", steps=3, lr=1e-4,
                   lora_lr=1e-3, seed=0, prompts=4, repeats=2, class_images=2, sample_steps=2, sampler="ddim",
                   guidance=4.0,
                   torch="2", seconds=60.0,
                   table=[dict(model="before", prior=None, **row),
                          dict(model="lora", prior=True, seconds=12.3, peak_rss_mib=900.4, **row)])
    text = markdown(results)
    assert "| before | - | 100.0% | 50.0% | 25.0% | 0.0% | 40.0% | 12.5% | - | - |" in text
    assert "| lora | yes | 100.0% | 50.0% | 25.0% | 0.0% | 40.0% | 12.5% | 12 s | 900 MiB |" in text
    assert "weights 0123456789ab" in text and "2026-12-02" in text and "2 DDIM steps" in text


@pytest.mark.slow  # six dreambooth.py processes (~15 s each to start) and 7 x 12 images: 2.5 min
def test_command_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # it runs dreambooth.py from the repository root
    out = tmp_path / "db"
    toy_main(["dreambooth", "--model", str(TEACHER), "--out", str(out), "--steps", "2", "--prompts", "4",
              "--repeats", "2", "--class-images", "2", "--sample-steps", "2"])
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["table"]] == ["rendered", "before", *RUNS]
    assert [r["prior"] for r in results["table"]] == [None, None, True, False, True, False, True, False]
    assert all(0 <= r[key] <= 1 for r in results["table"] for _, key in COLUMNS)
    for r in results["table"]:
        assert (r["model"] in ("rendered", "before")) != ("peak_rss_mib" in r and r["seconds"] > 0)
    # the upper bound: what the prompts describe, as the world renders it
    assert results["table"][0] | dict(model=0) == dict(model=0, prior=None, instance_subject=1.0, subject=1.0,
                                                       subject_and_caption=1.0, caption_with_subject=1.0,
                                                       class_prompt_subject=0.0, class_caption=1.0,
                                                       class_subject=0.0)
    assert results["model"] == str(TEACHER) and len(results["fingerprint"]) == 12 and results["steps"] == 2
    assert (out / "results.md").read_text() == markdown(results)
    assert len(list((out / "instance").glob("*.png"))) == 5
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert (out / "full" / "model_index.json").is_file()
    assert not (out / "full-no-prior" / "class_images").exists()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # LoCon's file holds the ResBlock convs' factors (4-dimensional), plain LoRA's only Linears'
    for run, convs in (("lora", False), ("locon", True)):
        factors = load_file(out / run / "pytorch_lora_weights.safetensors")
        assert any(".resnets." in k and v.ndim == 4 for k, v in factors.items()) == convs, run
    assert sorted(p.name for p in (out / "lora" / "subject").iterdir()) == [f"{i:03d}.png" for i in range(4)]
    assert Image.open(out / "grid.png").size[1] == 8 * 128  # the rendered row, then one row per model


@pytest.mark.slow  # 2 x 300 training steps and 3 x 24 images: 5 min on one CPU thread
def test_fine_tuning_learns_the_subject_and_drifts_without_the_prior(tmp_path, monkeypatch):
    """The real pipeline, reduced to two runs: before, the teacher never draws the subject; after 300 steps of
    full fine-tuning or of LoCon without prior preservation it draws it for the instance prompt, and for the
    class prompt too (language drift). Measured on their first 8 seeds (the runs of docs/personalization.md's
    full-no-prior and locon-no-prior, on the shipped teacher): 0/8 before; full 8/8 for the instance prompt and
    8/8 for the class prompt after, LoCon 8/8 and 8/8 (on the first toy teacher: 8/8 and 8/8, 5/8 and 5/8)."""
    monkeypatch.chdir(ROOT)
    results = run_toy_dreambooth(TEACHER, tmp_path / "db", steps=300, lr=2e-4, lora_lr=2e-3, seed=1234,
                                 num_prompts=4, repeats=8, class_images=2, sample_steps=25, guidance=4.0,
                                 runs=("full-no-prior", "locon-no-prior"))
    rendered, before, full, locon = results["table"]
    assert rendered["instance_subject"] == 1.0 and before["model"] == "before"
    assert before["instance_subject"] <= 0.25 and before["class_prompt_subject"] <= 0.25, before
    assert full["instance_subject"] >= before["instance_subject"] + 0.5, full
    assert full["class_prompt_subject"] >= 0.25, full
    assert locon["instance_subject"] >= before["instance_subject"] + 0.5, locon
    assert locon["class_prompt_subject"] >= 0.25, locon
