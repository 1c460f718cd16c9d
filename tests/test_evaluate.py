"""evaluate.py's generation step: one image per prompt at 512 (here smaller) and its squashed
bicubic copy, resumable, with per-prompt seeds that do not depend on the batch size."""

import json

import numpy as np
import pytest
from PIL import Image
from reference import VAE_SMALL, reduced_config, reference_parts, save_hub_layout, text_config

import minisd
from evaluate import main as evaluate
from minisd.evaluation import billions

PROMPTS = [("a.png", 'a red, round "apple"'), ("sub/b.png", "a cat on a mat"), ("c.png", "a dog"),
           ("d.png", "a boat")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    parts = reference_parts("v1", reduced_config("v1", "tiny"), text_config("v1", 96, 2, 4), VAE_SMALL,
                            seed=5)
    return save_hub_layout(parts, "v1", tmp_path_factory.mktemp("eval"))[1]


def write_prompts(path, rows, header="file_name,text"):
    lines = [header] + [f'{name},"{text.replace(chr(34), chr(34) * 2)}"' for name, text in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(model, prompts, out, *extra):
    return evaluate(["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--size", "32",
                     "--eval-size", "16", "--steps", "2", "--metrics", "none", "--no-progress", *extra])


def test_generates_both_sizes_and_resumes(model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "metadata.csv", PROMPTS)
    assert run(model, prompts, tmp_path / "r", "--num", "3", "--batch-size", "2") == 0
    for name, _ in PROMPTS[:3]:
        assert Image.open(tmp_path / "r" / "im512" / name).size == (32, 32)
        small = Image.open(tmp_path / "r" / "im256" / name)
        big = Image.open(tmp_path / "r" / "im512" / name)
        assert small.size == (16, 16) and np.array_equal(np.asarray(small), np.asarray(big.resize((16, 16))))
    assert not (tmp_path / "r" / "im512" / "d.png").exists()
    capsys.readouterr()
    assert run(model, prompts, tmp_path / "r") == 0  # only the missing fourth image is made
    assert "(1 generated now)" in capsys.readouterr().out


def test_per_prompt_seeds_do_not_depend_on_batch_size(model, tmp_path):
    prompts = write_prompts(tmp_path / "metadata.csv", PROMPTS)
    assert run(model, prompts, tmp_path / "b1", "--batch-size", "1") == 0
    assert run(model, prompts, tmp_path / "b3", "--batch-size", "3") == 0
    for name, text in PROMPTS:
        one, three = (np.asarray(Image.open(tmp_path / d / "im512" / name), dtype=int) for d in ("b1", "b3"))
        assert np.abs(one - three).max() <= 2, name
    # and prompt i is the pipeline's image for seed 1234 + i
    expected = minisd.load_pipeline(model)(PROMPTS[2][1], steps=2, seed=1234 + 2, height=32, width=32,
                                           progress=False)
    assert np.abs(np.asarray(expected[0],
                             dtype=int) - np.asarray(Image.open(tmp_path / "b1" / "im512" / "c.png"),
                                                                   dtype=int)).max() <= 2


def test_bad_prompts_file(model, tmp_path, capsys):
    assert run(model, write_prompts(tmp_path / "bad.csv", PROMPTS, header="image,caption"),
               tmp_path / "x") == 2
    assert "expected a header with file_name,text" in capsys.readouterr().err
    assert run(model, tmp_path / "missing.csv", tmp_path / "x") == 2
    assert "prompts file not found" in capsys.readouterr().err


def test_writes_scores_row_and_grid(model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "metadata.csv", PROMPTS)
    assert run(model, prompts, tmp_path / "r", "--num", "2", "--name", "tiny") == 0
    scores = json.loads((tmp_path / "r" / "scores.json").read_text())
    pipe = minisd.load_pipeline(model)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    assert scores["num_images"] == 2 and scores["unet_params"] == unet
    assert scores["total_params"] == unet + sum(p.numel() for m in (pipe.vae, pipe.text_encoder)
                                                for p in m.parameters())
    assert (scores["steps"] == 2 and scores["seed_mode"] == "per_prompt"
            and scores["generation"]["images"] == 2)
    row = f"| tiny | - | - | - | {unet / 1e6:.2f}M | {scores['total_params'] / 1e6:.2f}M |"
    assert billions(859_520_964) == "0.86B" and billions(1_040_000_000) == "1.04B"
    assert (tmp_path / "r"
            / "scores.md").read_text().splitlines()[-1] == row and row in capsys.readouterr().out
    assert Image.open(tmp_path / "r" / "grid.png").size == (2 * 256, 256 + 44)


def test_score_errors(model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "metadata.csv", PROMPTS)
    assert run(model, prompts, tmp_path / "r", "--num", "2") == 0
    capsys.readouterr()

    weights = tmp_path / "inception.pth"  # found before any image is made; read only when scoring
    weights.write_bytes(b"")

    def error(*extra):
        assert evaluate(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
                         "--size", "32", "--eval-size", "16", "--steps", "2", "--num", "2", "--no-progress",
                         "--inception-weights", str(weights), *extra]) == 2
        return capsys.readouterr().err

    assert "unknown metric(s) ['fud']" in error("--metrics", "fud")
    assert "FID needs real-image statistics: pass --fid-stats" in error("--metrics", "fid")
    assert "FID statistics file not found" in error("--fid-stats", str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "s256.npz", mu=np.zeros(3), sigma=np.eye(3), size=256)
    assert "holds statistics of 256 px images but the scores read 16 px" in error(
        "--metrics", "fid", "--fid-stats", str(tmp_path / "s256.npz"))
    Image.new("RGB", (16, 16)).save(tmp_path / "r" / "im256" / "stray.png")
    assert "holds 3 images but the prompts ask for 2" in error("--metrics", "is")
    (tmp_path / "r" / "im256" / "stray.png").unlink()
    (tmp_path / "r" / "im256" / PROMPTS[0][0]).unlink()
    (tmp_path / "r" / "im512" / PROMPTS[0][0]).unlink()
    assert evaluate(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "r"), "--size",
                     "32", "--eval-size", "16", "--steps", "2", "--num", "2", "--metrics", "none",
                     "--no-progress"]) == 0
