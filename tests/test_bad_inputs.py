"""Bad inputs, one table per script: each row is (id, command-line arguments, exit code, words the error must
contain). Every row must fail with one line `SCRIPT: error: ...` that holds the words, no traceback, and
before any image is generated or any training step taken. The scripts run in-process (their `main(argv)`), on
the toy model weights/toy-sd and on broken copies of it. In the arguments, {model} is weights/toy-sd and {tmp}
the folder `inputs` fills."""

import errno
import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dreambooth
import evaluate
import minisd.convert
import sample
import train
import train_lcm
import train_vae
from minisd.pipeline import Pipeline
from minisd.toy.dataset import write_dataset
from minisd.training import TrainState

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "toy-sd"
FAST = ["--steps", "1", "--no-progress"]

SAMPLE = [
    ("guidance-nan", ["a", "--guidance", "nan"], 2, ["--guidance", "not a finite number"]),
    ("guidance-inf", ["a", "--guidance", "inf"], 2, ["--guidance", "not a finite number"]),
    ("strength-nan", ["a", "--strength", "nan"], 2, ["--strength", "not a finite number"]),
    ("strength-above-1", ["a", "--strength", "1.5"], 2, ["--strength", "(0, 1]"]),
    ("guidance-rescale-above-1", ["a", "--guidance-rescale", "1.5"], 2, ["--guidance-rescale", "in [0, 1]"]),
    ("steps-0", ["a", "--steps", "0"], 2, ["--steps", ">= 1"]),
    ("num-images-0", ["a", "--num-images", "0"], 2, ["--num-images", ">= 1"]),
    ("height-not-multiple-of-8", ["a", "--height", "30"], 2, ["--height", "multiple of 8"]),
    ("out-unknown-suffix", ["a", "--out", "{tmp}/x.gif"], 2, ["--out", ".gif", ".png"]),
    ("out-no-suffix", ["a", "--out", "{tmp}/x"], 2, ["--out", "without a suffix"]),
    ("out-is-a-folder", ["a", "--out", "{tmp}/folder.png"], 2, ["--out", "is a folder"]),
    ("out-unwritable", ["a", "--out", "/proc/minisd/x.png"], 2, ["--out", "cannot create the folder"]),
    ("device-unknown", ["a", "--device", "tpu7"], 2, ["unknown device 'tpu7'", "cpu"]),
    ("device-missing-gpu", ["a", "--device", "cuda:99"], 2, ["--device cuda:99"]),
    ("model-missing", ["a", "--model", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder or a hub id"]),
    ("config-truncated", ["a", "--model", "{tmp}/truncated"], 2,
     ["truncated/unet/config.json", "not valid JSON"]),
    ("config-binary", ["a", "--model", "{tmp}/binary-config"], 2, ["binary-config/vae/config.json",
                                                                   "not a text file"]),
    ("vocab-truncated", ["a", "--model", "{tmp}/bad-vocab"], 2,
     ["bad-vocab/tokenizer/vocab.json", "truncated"]),
    ("unet-not-its-config", ["a", "--model", "{tmp}/mismatch"], 2, ["U-Net weights", "mismatch/unet",
                                                                    "does not match", "wrongly shaped"]),
    ("pickle-refused", ["a", "--model", "{tmp}/evil.ckpt"], 2,
     ["evil.ckpt", "refused to unpickle", "posix.system"]),
    ("checkpoint-truncated", ["a", "--model", "{tmp}/cut.ckpt"], 2, ["cut.ckpt", "truncated"]),
    ("checkpoint-copied-away", ["a", "--model", "{tmp}/checkpoint-0000010"], 2,
     ["vae/", "links", "python -m minisd.convert"]),
    ("init-image-unreadable", ["a", "--init-image", "{tmp}/prompts.csv"], 2, ["cannot read init image"]),
    ("lora-missing", ["a", "--lora", "{tmp}/none.safetensors"], 2,
     ["--lora", "none.safetensors", "no such file"]),
    ("lora-not-a-lora", ["a", "--lora", "{tmp}/whole.ckpt"], 2, ["--lora", "whole.ckpt", "not a LoRA file"]),
    ("lora-truncated", ["a", "--lora", "{tmp}/cut.ckpt"], 2, ["--lora", "cut.ckpt", "truncated"]),
    ("lora-scale-without-lora", ["a", "--lora-scale", "0.5"], 2, ["1 --lora-scale for 0 --lora"]),
    ("lora-scale-nan", ["a", "--lora-scale", "nan"], 2, ["--lora-scale", "not a finite number"]),
    ("vae-missing", ["a", "--vae", "{tmp}/none"], 2, ["--vae", "none", "no such folder"]),
    ("vae-not-a-vae", ["a", "--vae", "{tmp}/folder.png"], 2, ["--vae", "folder.png", "holds no VAE"]),
]

EVALUATE = [
    ("num-0", ["--num", "0"], 2, ["--num", ">= 1"]),
    ("num-negative", ["--num", "-1"], 2, ["--num", ">= 1"]),
    ("guidance-nan", ["--guidance", "nan"], 2, ["--guidance", "not a finite number"]),
    ("steps-0", ["--steps", "0"], 2, ["--steps", ">= 1"]),
    ("batch-size-0", ["--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    ("size-not-multiple-of-8", ["--size", "30"], 2, ["--size", "multiple of 8"]),
    ("device-unknown", ["--device", "tpu7"], 2, ["unknown device 'tpu7'"]),
    ("device-missing-gpu", ["--device", "cuda:99"], 2, ["--device cuda:99"]),
    ("file-name-leaves-out", ["--prompts", "{tmp}/escape.csv"], 2, ["escape.csv, line 3", "'../x.png'",
                                                                    "leaves the results folder"]),
    ("file-name-absolute", ["--prompts", "{tmp}/absolute.jsonl"], 2, ["absolute.jsonl, line 1", "leaves"]),
    ("file-name-not-an-image", ["--prompts", "{tmp}/text-name.csv"], 2, ["line 2", "'a.txt'", ".png"]),
    ("file-name-twice", ["--prompts", "{tmp}/twice.csv"], 2, ["line 3", "also on line 2"]),
    ("prompt-blank", ["--prompts", "{tmp}/blank.csv"], 2, ["blank.csv, line 5", "blank"]),
    ("prompts-binary", ["--prompts", "{tmp}/binary.csv"], 2, ["binary.csv", "not a UTF-8 text file"]),
    ("prompts-nul-bytes", ["--prompts", "{tmp}/nul.csv"], 2, ["nul.csv", "not a UTF-8 text file"]),
    ("prompts-bad-header", ["--prompts", "{tmp}/header.csv"], 2, ["header.csv", "file_name,text"]),
    ("out-unwritable", ["--out", "/proc/minisd/r"], 2, ["--out", "cannot create the folder"]),
    ("inception-weights-missing", ["--metrics", "is", "--inception-weights", "{tmp}/none.pth"], 2,
     ["--inception-weights", "none.pth", "no such file"]),
    ("fid-stats-missing", ["--metrics", "fid", "--fid-stats", "{tmp}/none.npz"], 2,
     ["none.npz", "not found"]),
    ("fid-stats-other-size", ["--metrics", "fid", "--fid-stats", "{tmp}/s256.npz", "--inception-weights",
                              "{tmp}/prompts.csv"], 2, ["s256.npz", "256 px", "16 px"]),
    ("clip-weights-missing", ["--metrics", "clip", "--clip-model", "ViT-B-32", "--clip-pretrained",
                              "{tmp}/none.safetensors"], 2, ["unknown pretrained weights"]),
    ("config-truncated", ["--model", "{tmp}/truncated"], 2, ["truncated/unet/config.json", "not valid JSON"]),
    ("dreambooth-without-subjects", ["--protocol", "dreambooth"], 2, ["needs --subjects DIR"]),
    ("dreambooth-subjects-missing",
     ["--protocol", "dreambooth", "--subjects", "{tmp}/nothing",
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt")],
     2, ["subjects folder not found: {tmp}/nothing"]),
    ("dreambooth-prompts-not-the-format",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth")],
     2, ["prompts.csv is not in the format of google/dreambooth's prompts_and_classes.txt"]),
    ("dreambooth-subject-without-images",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/no-images.txt")],
     2, ["subject folder", "empty holds no images"]),
    ("dreambooth-models-match-nothing",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt"),
      "--models", "{tmp}/nothing/{{subject}}"],
     2, ["--models {tmp}/nothing/{{subject}} matches no model", "(subject ball)"]),
    ("dreambooth-dino-weights-missing",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt"),
      "--metrics", "dino", "--dino-weights", "{tmp}/none.pth"],
     2, ["--dino-weights {tmp}/none.pth: no such file"]),
    ("dreambooth-clip-weights-missing",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt"),
      "--metrics", "clip", "--clip-model", "ViT-B-32", "--clip-pretrained", "{tmp}/none.safetensors"],
     2, ["unknown pretrained weights"]),
    ("dreambooth-metric-unknown",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt"), "--metrics", "fid"],
     2, ["unknown metric(s) ['fid'] for --protocol dreambooth"]),
    ("dreambooth-images-not-generated",
     ["--protocol", "dreambooth", "--subjects", str(ROOT / "tests/data/dreambooth"),
      "--prompts", str(ROOT / "tests/data/dreambooth/prompts_and_classes.txt"),
      "--images", "{tmp}/toy/train"],
     2, ["20 of 20 images are missing from {tmp}/toy/train", "SUBJECT/PP-K.png"]),
    ("dreambooth-identifier-blank", ["--protocol", "dreambooth", "--subjects", "{tmp}", "--identifier", " "],
     2, ["--identifier is blank"]),
]

# T: train.py with a small valid run (weights/toy-sd as the teacher, 4 toy images at 32 px)
TRAIN = [
    ("data-missing", ["--data", "{tmp}/nothing"], 2, ["nothing does not exist"]),
    ("data-no-metadata", ["--data", "{tmp}/folder.png"], 2, ["neither metadata.csv"]),
    ("data-bad-header", ["--data", "{tmp}/data-header"], 2, ["metadata.csv", "expected file_name and text"]),
    ("data-header-only", ["--data", "{tmp}/data-empty"], 2, ["lists no images"]),
    ("data-fewer-than-a-batch", ["--batch-size", "8", "--global-batch", "8"], 2,
     ["holds 4 images, fewer than one batch", "--batch-size"]),
    ("teacher-missing", ["--teacher", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder or a hub id"]),
    ("teacher-config-truncated", ["--teacher", "{tmp}/truncated"], 2,
     ["truncated/unet/config.json", "not valid JSON"]),
    ("batch-size-0", ["--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    ("batch-size-negative", ["--batch-size", "-2"], 2, ["--batch-size", ">= 1"]),
    ("global-batch-not-a-multiple", ["--global-batch", "3"], 2, ["--global-batch 3 is not a multiple"]),
    ("max-steps-0", ["--max-steps", "0"], 2, ["--max-steps", ">= 1"]),
    ("save-steps-0", ["--save-steps", "0"], 2, ["--save-steps", ">= 1"]),
    ("log-steps-0", ["--log-steps", "0"], 2, ["--log-steps", ">= 1"]),
    ("resolution-0", ["--resolution", "0"], 2, ["--resolution", ">= 1"]),
    ("resolution-not-multiple-of-8", ["--resolution", "30"], 2, ["--resolution 30", "multiple of 8"]),
    ("lr-nan", ["--lr", "nan"], 2, ["--lr", "not a finite number"]),
    ("lr-inf", ["--lr", "inf"], 2, ["--lr", "not a finite number"]),
    ("lr-0", ["--lr", "0"], 2, ["--lr", "> 0"]),
    ("max-grad-norm-nan", ["--max-grad-norm", "nan"], 2, ["--max-grad-norm", "not a finite number"]),
    ("lambda-nan", ["--lambda-feat", "nan"], 2, ["--lambda-feat", "not a finite number"]),
    ("snr-gamma-inf", ["--snr-gamma", "inf"], 2, ["--snr-gamma", "not a finite number"]),
    ("caption-dropout-nan", ["--caption-dropout", "nan"], 2, ["--caption-dropout", "not a finite number"]),
    ("ema-decay-above-1", ["--ema-decay", "1.5"], 2, ["--ema-decay 1.5", "(0, 1)"]),
    ("out-unwritable", ["--out", "/proc/minisd/run"], 2, ["--out", "cannot create the folder"]),
    ("out-holds-another-run", ["--out", "{tmp}/other-run"], 2,
     ["holds another run", "teacher", "--overwrite"]),
    ("resume-not-a-checkpoint", ["--resume", "{tmp}/folder.png"], 2, ["not a checkpoint folder"]),
    ("resume-pickle-refused", ["--resume", "{tmp}/evil-checkpoint"], 2,
     ["evil-checkpoint/training_state.pt", "refused to unpickle", "posix.system"]),
    ("resume-truncated", ["--resume", "{tmp}/cut-checkpoint"], 2, ["cut-checkpoint/training_state.pt",
                                                                   "truncated"]),
    ("unet-config-truncated", ["--plain", "--unet-config", "{tmp}/truncated/unet/config.json"], 2,
     ["truncated/unet/config.json", "not valid JSON"]),
]

# train_vae.py: --init weights/toy-sd/vae, unless the row gives --config
TRAIN_VAE = [
    ("out-is-init", ["--out", "{model}/vae"], 2, ["is the --init model", "new --out"]),
    ("init-missing", ["--init", "{tmp}/nothing"], 2, ["nothing/config.json"]),
    ("config-binary", ["--config", "{tmp}/binary-config/vae/config.json"], 2,
     ["binary-config/vae/config.json", "not a text file"]),
    ("data-missing", ["--data", "{tmp}/nothing"], 2, ["nothing does not exist"]),
    ("data-header-only", ["--data", "{tmp}/data-empty"], 2, ["lists no images"]),
    ("data-fewer-than-a-batch", ["--batch-size", "8"], 2, ["holds 4 images, fewer than one batch"]),
    ("device-unknown", ["--device", "tpu7"], 2, ["unknown device 'tpu7'"]),
    ("device-missing-gpu", ["--device", "cuda:99"], 2, ["--device cuda:99"]),
    ("lr-nan", ["--lr", "nan"], 2, ["--lr", "not a finite number"]),
    ("lr-inf", ["--lr", "inf"], 2, ["--lr", "not a finite number"]),
    ("kl-weight-nan", ["--kl-weight", "nan"], 2, ["--kl-weight", "not a finite number"]),
    ("l2-weight-negative", ["--l2-weight", "-1"], 2, ["--l2-weight", ">= 0"]),
    ("batch-size-0", ["--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    ("max-steps-0", ["--max-steps", "0"], 2, ["--max-steps", ">= 1"]),
    ("save-steps-0", ["--save-steps", "0"], 2, ["--save-steps", ">= 1"]),
    ("log-steps-0", ["--log-steps", "0"], 2, ["--log-steps", ">= 1"]),
    ("resolution-not-multiple-of-8", ["--resolution", "30"], 2, ["--resolution 30", "multiple of 8"]),
    ("out-unwritable", ["--out", "/proc/minisd/vae"], 2, ["--out", "cannot create the folder"]),
    ("out-holds-another-run", ["--out", "{tmp}/other-vae"], 2, ["holds another run", "start", "--overwrite"]),
]

# dreambooth.py: the toy model, 4 toy scenes as the subject, prior preservation with class prompt "a shape"
DREAMBOOTH = [
    ("instance-data-missing", ["--instance-data", "{tmp}/nothing"], 2, ["--instance-data", "not a folder"]),
    ("instance-data-no-images", ["--instance-data", "{tmp}/data-empty"], 2, ["--instance-data", "no images"]),
    ("class-prompt-missing", ["--class-prompt", ""], 2,
     ["needs --class-prompt", "--no-with-prior-preservation"]),
    ("model-missing", ["--model", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder or a hub id"]),
    ("class-model-missing", ["--class-model", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder"]),
    ("lr-nan", ["--lr", "nan"], 2, ["--lr", "not a finite number"]),
    ("prior-loss-weight-inf", ["--prior-loss-weight", "inf"], 2,
     ["--prior-loss-weight", "not a finite number"]),
    ("class-guidance-nan", ["--class-guidance", "nan"], 2, ["--class-guidance", "not a finite number"]),
    ("max-steps-0", ["--max-steps", "0"], 2, ["--max-steps", ">= 1"]),
    ("batch-size-above-the-photos", ["--batch-size", "8"], 2, ["holds 4 images, fewer than one batch"]),
    ("resolution-not-multiple-of-8", ["--resolution", "30"], 2, ["--resolution 30", "multiple of 8"]),
    ("device-unknown", ["--device", "tpu7"], 2, ["unknown device 'tpu7'"]),
    ("out-unwritable", ["--out", "/proc/minisd/db"], 2, ["--out", "cannot create the folder"]),
    ("out-holds-another-run", ["--out", "{tmp}/other-run"], 2, ["holds another run", "--overwrite"]),
    ("export-kohya-without-lora", ["--export-kohya"], 2, ["--export-kohya", "needs --lora"]),
    ("lora-rank-0", ["--lora", "--rank", "0"], 2, ["--rank", ">= 1"]),
    ("lora-targets-the-text-encoder-lacks", ["--lora", "--lora-targets", "conv1"], 2,
     ["--lora-targets conv1 name no layer of the text encoder", "--no-train-text-encoder"]),
]

# train_lcm.py: the toy model as the teacher, 4 toy scenes
TRAIN_LCM = [
    ("teacher-missing", ["--teacher", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder or a hub id"]),
    ("data-missing", ["--data", "{tmp}/nothing"], 2, ["nothing does not exist"]),
    ("data-fewer-than-a-batch", ["--batch-size", "8"], 2, ["holds 4 images, fewer than one batch"]),
    ("w-range-reversed", ["--w-min", "9", "--w-max", "3"], 2, ["--w-min 9.0 is above --w-max 3.0"]),
    ("w-nan", ["--w-max", "nan"], 2, ["--w-max", "not a finite number"]),
    ("lr-inf", ["--lr", "inf"], 2, ["--lr", "not a finite number"]),
    ("ema-decay-1", ["--ema-decay", "1"], 2, ["--ema-decay 1.0", "(0, 1)"]),
    ("huber-negative", ["--huber-c", "-1"], 2, ["--huber-c", ">= 0"]),
    ("global-batch-not-a-multiple", ["--global-batch", "3"], 2, ["--global-batch 3 is not a multiple"]),
    ("resolution-not-multiple-of-8", ["--resolution", "30"], 2, ["--resolution 30", "multiple of 8"]),
    ("out-unwritable", ["--out", "/proc/minisd/lcm"], 2, ["--out", "cannot create the folder"]),
    ("out-holds-another-run", ["--out", "{tmp}/other-run"], 2, ["holds another run", "--overwrite"]),
    ("student-missing", ["--student", "{tmp}/nothing"], 2, ["nothing", "not a file, a folder or a hub id"]),
    ("student-with-another-vae", ["--student", "{tmp}/other-vae-model"], 2,
     ["--student", "has another vae than --teacher", "a student of this teacher"]),
]

CONVERT = [
    ("dest-inside-source", ["{model}", "{model}/copy"], 2, ["inside it"]),
    ("source-missing", ["{tmp}/nothing", "{tmp}/out"], 2, ["not a file, a folder or a hub id"]),
    ("config-truncated", ["{tmp}/truncated", "{tmp}/out"], 2,
     ["truncated/unet/config.json", "not valid JSON"]),
    ("checkpoint-copied-away", ["{tmp}/checkpoint-0000010", "{tmp}/out"], 2, ["links", "cp -rL"]),
]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Broken models and prompts files, one of each kind the tables name."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "folder.png").mkdir()
    prompts = "file_name,text\na.png,a red circle\nb.png,a blue square\n"
    (tmp / "prompts.csv").write_text(prompts)
    (tmp / "escape.csv").write_text("file_name,text\na.png,a red circle\n../x.png,a blue square\n")
    (tmp / "absolute.jsonl").write_text('{"file_name": "/tmp/x.png", "text": "a"}\n')
    (tmp / "text-name.csv").write_text("file_name,text\na.txt,a red circle\n")
    (tmp / "twice.csv").write_text("file_name,text\na.png,a red circle\nsub/../a.png,a blue square\n")
    # the caption of line 3 goes on over line 4, so the blank prompt is the third row but on line 5
    (tmp / "blank.csv").write_text('file_name,text\na.png,one\nb.png,"two\nlines"\nc.png,   \n')
    (tmp / "binary.csv").write_bytes(bytes(range(128, 256)) * 4)
    (tmp / "nul.csv").write_bytes(b"file_name,text\na.png,a\0b\n")
    (tmp / "header.csv").write_text("image,caption\na.png,a\n")
    (tmp / "uncheckable.csv").write_text("file_name,text\n0.png,a red fox jumping over a fence\n")
    np.savez(tmp / "s256.npz", mu=np.zeros(3), sigma=np.eye(3), size=256)
    write_dataset(tmp / "toy", n=4, seed=0, heldout=0.0, workers=1)
    for name, metadata in (("data-header", "image,caption\n0.png,a\n"), ("data-empty", "file_name,text\n")):
        (tmp / name).mkdir()
        (tmp / name / "metadata.csv").write_text(metadata)
    # run folders that another run made (train.py's and train_vae.py's run.json)
    (tmp / "other-run").mkdir()
    (tmp / "other-run" / "run.json").write_text('{"teacher": "CompVis/stable-diffusion-v1-4"}')
    (tmp / "other-vae").mkdir()
    (tmp / "other-vae" / "run.json").write_text('{"start": "--config x.json"}')
    for name, step in (("evil-checkpoint", Evil()), ("cut-checkpoint", torch.zeros(100))):
        (tmp / name).mkdir()
        torch.save({"step": step}, tmp / name / "training_state.pt")
    whole = (tmp / "cut-checkpoint" / "training_state.pt").read_bytes()
    (tmp / "cut-checkpoint" / "training_state.pt").write_bytes(whole[:200])

    for name in ("truncated", "binary-config", "mismatch", "bad-vocab", "other-vae-model"):
        shutil.copytree(TOY, tmp / name)
    vae = tmp / "other-vae-model" / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(vae).items()}, vae)
    vocab = (tmp / "bad-vocab" / "tokenizer" / "vocab.json").read_bytes()
    (tmp / "bad-vocab" / "tokenizer" / "vocab.json").write_bytes(vocab[:1000])
    config = (tmp / "truncated" / "unet" / "config.json").read_text()
    assert '"layers_per_block": 2' in config
    (tmp / "truncated" / "unet" / "config.json").write_text(config[:len(config) // 2])
    (tmp / "binary-config" / "vae" / "config.json").write_bytes(bytes(range(256)))
    (tmp / "mismatch" / "unet" / "config.json").write_text(config.replace('"layers_per_block": 2',
                                                                          '"layers_per_block": 1'))
    torch.save({"state_dict": {"x": Evil()}}, tmp / "evil.ckpt")
    torch.save({"x": torch.zeros(100)}, tmp / "whole.ckpt")
    (tmp / "cut.ckpt").write_bytes((tmp / "whole.ckpt").read_bytes()[:200])
    # a train.py checkpoint copied without its run folder: the shared parts are links to ../NAME
    checkpoint = tmp / "checkpoint-0000010"
    shutil.copytree(TOY / "unet", checkpoint / "unet")
    shutil.copy(TOY / "model_index.json", checkpoint)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        os.symlink(Path("..") / name, checkpoint / name, target_is_directory=True)
    return tmp


@pytest.fixture
def no_generation(monkeypatch):
    """Every row must fail before the first image or training step: either is a test failure."""
    def work(*args, **kwargs):
        raise AssertionError("work was done although the input is bad")
    monkeypatch.setattr(Pipeline, "__call__", work)
    monkeypatch.setattr(train, "kd_step", work)
    monkeypatch.setattr(TrainState, "restore", work)  # a resumed state must be checked first
    monkeypatch.setattr(train_vae, "batches", work)
    monkeypatch.setattr(dreambooth, "batches", work)
    monkeypatch.setattr(train_lcm, "batches", work)


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of a script's main, argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def check(script: str, code: int, err: str, expected: int, words: list[str], tmp: Path):
    assert code == expected, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1, err
    for word in words:
        assert word.format(tmp=tmp) in lines[0], (word, lines[0])


def fill(argv: list[str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, model=TOY) for a in argv]


# ---- sample.py
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code, words", [row[1:] for row in SAMPLE], ids=[row[0] for row in SAMPLE])
def test_sample_bad_input(inputs, no_generation, capsys, argv, code, words):
    base = ["--model", str(TOY), "--out", str(inputs / "s.png"), *FAST]
    got, err = run(sample.main, [*base, *fill(argv, inputs)], capsys)
    check("sample.py", got, err, code, words, inputs)


def test_sample_full_disk(inputs, capsys, monkeypatch):
    """A disk that fills up while the images are written: one line that says so and where, exit code 1."""
    def full(image, path, settings):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(sample, "save_with_settings", full)
    got, err = run(sample.main, ["a", "--model", str(TOY), "--out", str(inputs / "full.png"), *FAST], capsys)
    check("sample.py", got, err, 1, ["could not write {tmp}/full.png", "No space left on device",
                                     "free some space"], inputs)


# ---- evaluate.py
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code, words", [row[1:] for row in EVALUATE], ids=[row[0] for row in EVALUATE])
def test_evaluate_bad_input(inputs, no_generation, capsys, argv, code, words):
    base = ["--model", str(TOY), "--prompts", str(inputs / "prompts.csv"), "--out", str(inputs / "r"),
            "--size", "32", "--eval-size", "16", "--metrics", "none", *FAST]
    got, err = run(evaluate.main, [*base, *fill(argv, inputs)], capsys)
    check("evaluate.py", got, err, code, words, inputs)


# ---- train.py and train_vae.py
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code, words", [row[1:] for row in TRAIN], ids=[row[0] for row in TRAIN])
def test_train_bad_input(inputs, no_generation, capsys, argv, code, words, request):
    base = ["--teacher", str(TOY), "--data", str(inputs / "toy" / "train"), "--variant", "tiny",
            "--resolution", "32", "--batch-size", "2", "--global-batch", "2", "--num-workers", "0",
            "--valid-steps", "0", "--no-compile", "--log-steps", "1", "--max-steps", "1",
            "--out", str(inputs / "runs" / request.node.callspec.id)]
    got, err = run(train.main, [*base, *fill(argv, inputs)], capsys)
    check("train.py", got, err, code, words, inputs)


@pytest.mark.parametrize("argv, code, words", [row[1:] for row in TRAIN_VAE],
                         ids=[row[0] for row in TRAIN_VAE])
def test_train_vae_bad_input(inputs, no_generation, capsys, argv, code, words, request):
    base = ["--data", str(inputs / "toy" / "train"), "--resolution", "32", "--batch-size", "2",
            "--num-workers", "0", "--max-steps", "1",
            "--out", str(inputs / "vaes" / request.node.callspec.id)]
    start = [] if "--config" in argv else ["--init", str(TOY / "vae")]
    got, err = run(train_vae.main, [*base, *start, *fill(argv, inputs)], capsys)
    check("train_vae.py", got, err, code, words, inputs)
    assert not (TOY / "vae" / "log.jsonl").exists()


@pytest.mark.parametrize("argv, code, words", [row[1:] for row in DREAMBOOTH],
                         ids=[row[0] for row in DREAMBOOTH])
def test_dreambooth_bad_input(inputs, no_generation, capsys, argv, code, words, request):
    base = ["--model", str(TOY), "--instance-data", str(inputs / "toy" / "train"), "--instance-prompt",
            "a sks shape", "--class-prompt", "a shape", "--num-class-images", "2", "--class-steps", "1",
            "--max-steps", "1", "--num-workers", "0", "--out", str(inputs / "db" / request.node.callspec.id)]
    got, err = run(dreambooth.main, [*base, *fill(argv, inputs)], capsys)
    check("dreambooth.py", got, err, code, words, inputs)


@pytest.mark.parametrize("argv, code, words", [row[1:] for row in TRAIN_LCM],
                         ids=[row[0] for row in TRAIN_LCM])
def test_train_lcm_bad_input(inputs, no_generation, capsys, argv, code, words, request):
    base = ["--teacher", str(TOY), "--data", str(inputs / "toy" / "train"), "--resolution", "32",
            "--batch-size", "2", "--num-workers", "0", "--max-steps", "1", "--valid-steps", "0",
            "--out", str(inputs / "lcm" / request.node.callspec.id)]
    got, err = run(train_lcm.main, [*base, *fill(argv, inputs)], capsys)
    check("train_lcm.py", got, err, code, words, inputs)


# ---- python -m minisd.convert
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code, words", [row[1:] for row in CONVERT], ids=[row[0] for row in CONVERT])
def test_convert_bad_input(inputs, capsys, argv, code, words):
    got, err = run(minisd.convert.main, fill(argv, inputs), capsys)
    check("minisd.convert", got, err, code, words, inputs)
    assert not (TOY / "copy").exists()


# ---- the package's own commands: python -m minisd.toy, minisd.bench, minisd.flops
# ----------------------------------

COMMANDS = [
    ("toy-heldout-nan", "minisd.toy", ["data", "--out", "{tmp}/toy-x", "--heldout", "nan"], ["--heldout"]),
    ("toy-n-0", "minisd.toy", ["data", "--out", "{tmp}/toy-x", "--n", "0"], ["--n", ">= 1"]),
    ("toy-lr-inf", "minisd.toy", ["ablation", "--out", "{tmp}/toy-x", "--lr", "inf"], ["--lr"]),
    ("toy-heldout-1", "minisd.toy", ["data", "--out", "{tmp}/toy-x", "--heldout", "1"], ["--heldout < 1"]),
    ("toy-ablation-no-data", "minisd.toy", ["ablation", "--data", "{tmp}/nothing"], ["nothing", "toy data set"]),
    ("toy-lcm-no-teacher", "minisd.toy", ["lcm", "--teacher", "{tmp}/nothing"], ["nothing", "model_index.json"]),
    ("toy-dreambooth-no-model", "minisd.toy", ["dreambooth", "--model", "{tmp}/nothing"],
     ["nothing", "model_index.json"]),
    ("toy-init-widths", "minisd.toy", ["init", "--vae", "{tmp}/nothing", "--out", "{tmp}/x", "--widths", "16",
                                       "32", "64", "72"], ["--widths", "multiples of 16"]),
    ("toy-export-no-vae", "minisd.toy", ["export", "--checkpoint", str(TOY), "--out", "{tmp}/x", "--vae",
                                         "{tmp}/nothing"], ["nothing", "config.json"]),
    ("toy-probe-no-data", "minisd.toy", ["probe", "--model", "{tmp}/nothing", "--data", "{tmp}/nothing"],
     ["nothing", "scenes.jsonl"]),
    ("toy-check-caption", "minisd.toy", ["check", "--images", "{tmp}/toy/train", "--metadata",
                                         "{tmp}/uncheckable.csv", "--workers", "1"],
     ["0.png", "cannot read its caption", "two of different colours", "grammar"]),
    ("toy-probe-both", "minisd.toy", ["probe", "--model", "a", "--vae", "b", "--data", "c"], ["not allowed"]),
    ("bench-peak-nan", "minisd.bench", ["sample", "--peak-tflops", "nan"], ["--peak-tflops"]),
    ("flops-steps-0", "minisd.flops", ["--steps", "0"], ["--steps", ">= 1"]),
]


@pytest.mark.parametrize("module, argv, words", [row[1:] for row in COMMANDS],
                         ids=[row[0] for row in COMMANDS])
def test_commands_bad_input(inputs, capsys, module, argv, words):
    main = importlib.import_module(module if module == "minisd.flops" else module + ".__main__").main
    got, err = run(main, fill(argv, inputs), capsys)
    assert got == 2 and "Traceback" not in err, err
    assert "error:" in err and all(word in err for word in words), err


# ---- python -m minisd.export
# -------------------------------------------------------------------------------------

EXPORT = [
    ("onnx-missing", ["{model}", "{tmp}/onnx"], 2, ["onnx is not installed", "requirements-export.txt"]),
    ("onnxruntime-missing", ["{model}", "{tmp}/onnx"], 2, ["onnxruntime is not installed",
                                                           "requirements-export.txt"]),
    ("out-exists", ["{model}", "{tmp}/other-run"], 2, ["other-run exists and is not empty", "--overwrite"]),
    ("out-is-a-file", ["{model}", "{tmp}/prompts.csv"], 2, ["prompts.csv is a file"]),
    ("family-unknown", ["{model}", "{tmp}/onnx", "--family", "v3"], 2, ["--family", "invalid choice: 'v3'"]),
    ("unet-of-another-model", ["{tmp}/sdxl-like", "{tmp}/onnx"], 2,
     ["U-Net config not supported", "addition_embed_type='text_time'"]),
    ("model-missing", ["{tmp}/nothing", "{tmp}/onnx"], 2, ["not a file, a folder or a hub id"]),
    ("opset-too-old", ["{model}", "{tmp}/onnx", "--opset", "13"], 2, ["--opset 13", "opsets 14 to 20"]),
    ("height-alone", ["{model}", "{tmp}/onnx", "--height", "64"], 2, ["--height and --width together"]),
    ("size-not-multiple-of-8", ["{model}", "{tmp}/onnx", "--height", "30", "--width", "32"], 2,
     ["--height", "multiple of 8"]),
    ("int8-of-fp16", ["{model}", "{tmp}/onnx", "--dtype", "fp16", "--quantize", "int8"], 2,
     ["--quantize int8", "--dtype fp32"]),
    ("lora-missing", ["{model}", "{tmp}/onnx", "--lora", "{tmp}/none.safetensors"], 2,
     ["--lora", "none.safetensors", "no such file"]),
    ("vae-missing", ["{model}", "{tmp}/onnx", "--vae", "{tmp}/none"], 2, ["--vae", "none", "no such folder"]),
]


@pytest.fixture(scope="module")
def another_model(inputs):
    """A folder that names a U-Net minisd does not build (SDXL's added time embedding)."""
    shutil.copytree(TOY, inputs / "sdxl-like")
    config = inputs / "sdxl-like" / "unet" / "config.json"
    config.write_text(config.read_text().replace('"addition_embed_type": null',
                                                 '"addition_embed_type": "text_time"'))
    return inputs


@pytest.mark.parametrize("argv, code, words", [row[1:] for row in EXPORT], ids=[row[0] for row in EXPORT])
def test_export_bad_input(another_model, capsys, monkeypatch, argv, code, words, request):
    import sys

    from minisd import export

    def work(*args, **kwargs):
        raise AssertionError("work was done although the input is bad")
    monkeypatch.setattr(export, "export_pipeline", work)
    missing = {"onnx-missing": "onnx", "onnxruntime-missing": "onnxruntime"}.get(request.node.callspec.id)
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # `import onnx` now raises ImportError
    got, err = run(export.main, fill(argv, another_model), capsys)
    check("python -m minisd.export", got, err, code, words, another_model)
