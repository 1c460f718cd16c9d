"""evaluate.py --protocol dreambooth: the data set's prompts file and its expansion, the pairing of generated
and real images, the means, resumption, torchrun slices and errors; end to end on the toy model, the scores
equal to what transformers' ViTModel (DINO) and open_clip (CLIP-I, CLIP-T) compute over the same files.

tests/data/dreambooth/ is a data set in the format of google/dreambooth's dataset/: two subjects (an object, a
live one) and a prompts_and_classes.txt with three object prompts and two live-subject prompts.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from reference import perturb_
from safetensors.torch import save_file
from test_clip_score import SMALL_QUICK, reference_transform
from test_dino import reference_vit
from torchvision import transforms

import evaluate
import minisd
from minisd.dreambooth_data import PROMPTS_FILE, Row, Subject, expand, read_prompts_file, read_subjects
from minisd.dreambooth_eval import image_files, markdown_rows, model_sources
from minisd.metrics.dino import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "dreambooth"
TOY = ROOT / "weights" / "toy-sd"
# a small DINO (64-wide heads) at 32 px: the eval transform scales with it, resize 36 and crop 32
DINO_SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
              "image_size": 32, "patch_size": 8}


def rows_of_fixture(per_prompt: int = 4) -> tuple[list[Subject], list[Row]]:
    prompts = read_prompts_file(DATA / PROMPTS_FILE)
    subjects = read_subjects(DATA, prompts)
    return subjects, expand(subjects, prompts, "sks", per_prompt)


def test_prompts_file_and_expansion():
    prompts = read_prompts_file(DATA / PROMPTS_FILE)
    assert prompts.classes == {"ball": "toy", "pup": "dog"}
    assert prompts.object_prompts[1] == "a red {0} {1}" and len(prompts.object_prompts) == 3
    assert prompts.live_prompts == ("a {0} {1} wearing a red hat", "a {0} {1} on the beach")
    subjects = read_subjects(DATA, prompts)  # the folder `empty`, which the table does not list, is left out
    found = [(s.name, s.class_name, s.live, len(s.images)) for s in subjects]
    assert found == [("ball", "toy", False, 2), ("pup", "dog", True, 3)]
    rows = expand(subjects, prompts, "sks", 4)
    assert len(rows) == 3 * 4 + 2 * 4  # objects take the object prompts, the dog the live-subject ones
    assert rows[0] == Row("ball/00-0.png", "a sks toy in the snow", "a toy in the snow", "ball")
    assert [r.file_name for r in rows[3:5]] == ["ball/00-3.png", "ball/01-0.png"]
    assert (rows[4].prompt, rows[4].clip_prompt) == ("a red sks toy", "a red toy")  # {0} then {1}
    assert rows[12] == Row("pup/00-0.png", "a sks dog wearing a red hat", "a dog wearing a red hat", "pup")
    assert expand(subjects, prompts, "zwx", 1)[-1].prompt == "a zwx dog on the beach"


@pytest.mark.parametrize("text, words", [
    ("subject_name,class\nball\n", ["line 2", "expected subject_name,class"]),
    ("subject_name,class\nball,toy\n\nObject Prompts\n'a {0} snow'.format(unique_token, class_token)\n",
     ["line 5", "{0} (the identifier) and {1}"]),
    ("subject_name,class\nball,toy\n\nObject Prompts\n'a {0} {2}'.format(unique_token, class_token)\n",
     ["line 5", "no other field"]),
    ("subject_name,class\nball,toy\n\nObject Prompts\n'a {0} {1}'.format(class_token, unique_token)\n",
     ["line 5", "expected a prompt template"]),
    ("subject_name,class\nball,toy\n\nObject Prompts\n'a {0} {1}'.format(unique_token, class_token)\n",
     ["no Live Subject Prompts list"]),
    ("file_name,text\na.png,a dog\n", ["no subject_name,class table, no Object Prompts list"]),
])
def test_prompts_file_errors(tmp_path, text, words):
    (tmp_path / "p.txt").write_text(text)
    with pytest.raises(ValueError) as error:
        read_prompts_file(tmp_path / "p.txt")
    for word in words:
        assert word in str(error.value)


def test_subject_folder_errors(tmp_path):
    prompts = read_prompts_file(DATA / "no-images.txt")
    with pytest.raises(ValueError, match="subject folder .*empty holds no images"):
        read_subjects(DATA, prompts)
    with pytest.raises(FileNotFoundError, match="no folder for subject 'ball'"):
        read_subjects(tmp_path, prompts)


def test_model_sources(tmp_path):
    subjects, _ = rows_of_fixture()
    (tmp_path / "db-ball").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no model for 1 of 2 subjects \(pup\)"):
        model_sources(f"{tmp_path}/db-{{subject}}", subjects)
    (tmp_path / "db-pup").mkdir()
    assert model_sources(f"{tmp_path}/db-{{subject}}", subjects) == {"ball": f"{tmp_path}/db-ball",
                                                                      "pup": f"{tmp_path}/db-pup"}
    assert set(model_sources(str(TOY), subjects).values()) == {str(TOY)}  # one model for every subject
    assert model_sources("someone/db-{subject}", subjects)["pup"] == "someone/db-pup"  # hub ids
    with pytest.raises(FileNotFoundError, match=r"matches no model: .*/runs/ball \(subject ball\)"):
        model_sources(f"{tmp_path}/runs/{{subject}}", subjects)
    with pytest.raises(FileNotFoundError, match=r"name each subject's model with \{subject\}"):
        model_sources(f"{tmp_path}/runs/x", subjects)


def test_image_files_pair_rows_and_files(tmp_path):
    _, rows = rows_of_fixture(per_prompt=1)
    paths = [(tmp_path / row.file_name).with_suffix(".jpg" if i == 1 else ".png")  # any image suffix
             for i, row in enumerate(rows)]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    assert image_files(tmp_path, rows) == paths
    (tmp_path / "pup" / "00-0.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 5 images are missing .* pup/00-0.png"):
        image_files(tmp_path, rows)
    Image.new("RGB", (8, 8)).save(tmp_path / "pup" / "00-0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "pup" / "00-1.png")
    with pytest.raises(ValueError, match="holds 1 images that no prompt asks for .*pup/00-1"):
        image_files(tmp_path, rows)


def test_table_rows():
    scores = {"dino": 0.6684, "clip_i": 0.8031, "clip_t": 0.3054, "unet_params": 482_346_884,
              "real": {"dino": 0.774, "clip_i": 0.885}, "subject_scores": ["dino"]}
    header, rows = markdown_rows("bk-small", scores)
    assert header == "| model | DINO | CLIP-I | CLIP-T | U-Net params |"
    assert rows.splitlines() == ["| real images (upper bound) | 0.774 | 0.885 | - | - |",
                                 "| bk-small | 0.668 | 0.803 | 0.305 | 0.48B |"]
    plugged = markdown_rows("toy", {"toy_subject": 0.5, "subject_scores": ["toy_subject"]})
    assert plugged[0] == "| model | DINO | toy_subject | CLIP-I | CLIP-T | U-Net params |"
    assert plugged[1].splitlines()[1] == "| toy | - | 0.500 | - | - | - |"


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
    """(ViTModel, its hub folder, open_clip CLIP, its folder): small random metric networks in their files."""
    root = tmp_path_factory.mktemp("weights")
    dino = reference_vit(DINO_SMALL, seed=4)
    dino.save_pretrained(root / "dino")
    torch.manual_seed(5)
    clip = perturb_(open_clip.model.CLIP(**SMALL_QUICK)).eval()
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(root / "clip" / "open_clip_model.safetensors"))
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_QUICK}))
    return dino, root / "dino", clip, root / "clip"


def run(out: Path, *extra: str) -> int:
    return evaluate.main(["--protocol", "dreambooth", "--subjects", str(DATA), "--out", str(out), "--size",
                          "32", "--steps", "1", "--no-progress", *extra])


def expected_scores(files: list[Path], rows: list[Row], subjects: list[Subject], dino, clip) -> dict:
    """Each score by the reference networks: per subject the mean over its pairs, then over the subjects."""
    bicubic = transforms.InterpolationMode.BICUBIC
    dino_transform = transforms.Compose([transforms.Resize(36, interpolation=bicubic),
                                         transforms.CenterCrop(32), transforms.ToTensor(),
                                         transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    clip_transform, tokenizer = reference_transform(112), open_clip.get_tokenizer("ViT-B-32")

    def unit(x):
        return (x / x.norm(dim=-1, keepdim=True)).double()

    found = {"dino": [], "clip_i": [], "clip_t": [], "real_dino": [], "real_clip_i": []}
    for subject in subjects:
        mine = [i for i, row in enumerate(rows) if row.subject == subject.name]
        generated = [Image.open(files[i]).convert("RGB") for i in mine]
        real = [Image.open(p).convert("RGB") for p in subject.images]
        n = len(real)
        with torch.no_grad():
            d_gen, d_real = (unit(dino(pixel_values=torch.stack([dino_transform(im) for im in ims]))
                                  .last_hidden_state[:, 0]) for ims in (generated, real))
            c_gen, c_real = (unit(clip.encode_image(torch.stack([clip_transform(im) for im in ims])))
                             for ims in (generated, real))
            text = unit(clip.encode_text(tokenizer([rows[i].clip_prompt for i in mine])))
        off_diagonal = 1 - torch.eye(n, dtype=torch.float64)
        found["dino"].append((d_gen @ d_real.T).mean())
        found["clip_i"].append((c_gen @ c_real.T).mean())
        found["clip_t"].append((c_gen * text).sum(-1).mean())
        found["real_dino"].append(((d_real @ d_real.T) * off_diagonal).sum() / (n * (n - 1)))
        found["real_clip_i"].append(((c_real @ c_real.T) * off_diagonal).sum() / (n * (n - 1)))
    return {k: float(np.mean(v)) for k, v in found.items()}


def test_generates_scores_and_resumes(metric_weights, tmp_path, capsys):
    dino, dino_dir, clip, clip_dir = metric_weights
    weights = ["--dino-weights", str(dino_dir), "--clip-model", str(clip_dir), "--score-batch-size", "3"]
    out = tmp_path / "bk-tiny-db"
    assert run(out, "--models", str(TOY), *weights) == 0
    assert "(20 generated now)" in capsys.readouterr().out
    subjects, rows = rows_of_fixture()
    files = [out / "images" / row.file_name for row in rows]
    assert all(f.is_file() for f in files) and Image.open(files[0]).size == (32, 32)

    scores = json.loads((out / "scores.json").read_text())
    expected = expected_scores(files, rows, subjects, dino, clip)
    for name in ("dino", "clip_i", "clip_t"):
        assert scores[name] == pytest.approx(expected[name], abs=1e-5), name
    assert scores["real"]["dino"] == pytest.approx(expected["real_dino"], abs=1e-5)
    assert scores["real"]["clip_i"] == pytest.approx(expected["real_clip_i"], abs=1e-5)
    assert scores["num_images"] == 20 and scores["subjects"]["pup"]["live"]
    assert scores["seed_mode"] == "per_prompt" and scores["subjects"]["ball"]["real_images"] == 2
    unet = sum(p.numel() for p in minisd.load_pipeline(TOY).unet.parameters())
    assert scores["unet_params"] == unet
    table = (out / "scores.md").read_text().splitlines()
    assert table[0] == "| model | DINO | CLIP-I | CLIP-T | U-Net params |"
    assert table[2] == (f"| real images (upper bound) | {scores['real']['dino']:.3f} | "
                        f"{scores['real']['clip_i']:.3f} | - | - |")
    assert table[3] == (f"| bk-tiny-db | {scores['dino']:.3f} | {scores['clip_i']:.3f} | "
                        f"{scores['clip_t']:.3f} | {unet / 1e6:.2f}M |")
    assert Image.open(out / "grids" / "pup.png").size == (5 * 256, 256 + 44)  # 3 photos, 2 prompts

    # already generated images, scored from their folder: the same scores, no model, no U-Net count
    assert run(tmp_path / "folder", "--images", str(out / "images"), *weights) == 0
    again = json.loads((tmp_path / "folder" / "scores.json").read_text())
    assert all(again[k] == scores[k] for k in ("dino", "clip_i", "clip_t"))
    assert (tmp_path / "folder" / "scores.md").read_text().splitlines()[3].endswith("| - |")

    # resumption: only what is missing is made, and it is the same image
    capsys.readouterr()
    before = np.asarray(Image.open(files[13]))
    files[13].unlink()
    assert run(out, "--models", str(TOY), "--metrics", "none") == 0
    assert "(1 generated now)" in capsys.readouterr().out
    assert np.abs(np.asarray(Image.open(files[13]), dtype=int) - before).max() <= 2


def test_torchrun_slices_and_seeds(tmp_path, monkeypatch, capsys):
    """Two processes: each makes its contiguous slice of the 20 rows; only the first scores; row i has the
    seed 1234 + i, whichever process and subject it falls to."""
    monkeypatch.setattr(evaluate, "wait_for_all", lambda world: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, rows = rows_of_fixture()
    out = tmp_path / "r"
    monkeypatch.setenv("RANK", "1")
    assert run(out, "--models", str(TOY), "--metrics", "none", "--batch-size", "3") == 0
    made = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.png"))
    assert made == sorted(row.file_name for row in rows[10:]) and not (out / "scores.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert run(out, "--models", str(TOY), "--metrics", "none") == 0
    assert (out / "scores.json").is_file() and len(list((out / "images").rglob("*.png"))) == 20
    expected = minisd.load_pipeline(TOY)(rows[13].prompt, steps=1, seed=1234 + 13, height=32, width=32,
                                         progress=False)[0]
    got = Image.open(out / "images" / rows[13].file_name)
    assert np.abs(np.asarray(expected, dtype=int) - np.asarray(got, dtype=int)).max() <= 2


def test_a_folder_of_images_is_checked_before_scoring(tmp_path, capsys):
    _, rows = rows_of_fixture()
    shutil.copytree(DATA / "ball", tmp_path / "images" / "ball")  # photos, not PP-K: missing and stray
    assert run(tmp_path / "r", "--images", str(tmp_path / "images"), "--metrics", "none") == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: 20 of 20 images are missing") and len(err.splitlines()) == 1
