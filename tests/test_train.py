"""train.py end to end on a tiny teacher (tests/reference.py's reduced SD-v1 in hub layout) and a few
generated image-caption pairs, on the CPU: the losses fall, a run resumes exactly (after a stop, a signal
or a kill during a save), bad images are skipped, a NaN stops the run, two gloo processes train as one,
and a checkpoint is a pipeline that sample.py and diffusers load."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from reference import VAE_SMALL, reduced_config, reference_parts, rel_diff, save_hub_layout, text_config
from safetensors import SafetensorError
from safetensors.torch import load_file

import train
from minisd import training
from minisd.checkpoints.diffusers import load_unet
from minisd.distill import student_from_teacher, total_loss
from minisd.pipeline import load_pipeline
from minisd.table import variant
from minisd.training import checkpoints, plot_losses, read_training_state
from sample import main as sample_main

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sd", "out", "feat")


def flags(teacher, data, out, **options) -> list[str]:
    """train.py's arguments: small and fast by default, each option as --name value."""
    settings = dict(teacher=teacher, data=data, out=out, variant="tiny", resolution=32, batch_size=4,
                    global_batch=4, max_steps=2, log_steps=1, save_steps=1000, valid_steps=0, num_workers=0)
    settings.update(options)
    return [arg for k, v in settings.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


def unet_weights(checkpoint: Path, folder: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(checkpoint / folder / "diffusion_pytorch_model.safetensors")


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n random 48x40 RGB PNGs (not square, so resize and crop do something); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{i}.png" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return names


def write_metadata(folder: Path, names: list[str]) -> None:
    # captions with a comma and quotes, which metadata.csv must quote
    rows = [f'{name},"a picture number {i}, with ""quotes"""' for i, name in enumerate(names)]
    (folder / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A reduced SD-v1 pipeline (1/8-width U-Net, 2-layer CLIP, 2-level VAE) in hub layout, random weights."""
    parts = reference_parts("v1", reduced_config("v1", "sd"), text_config("v1", 96, 2, 4), VAE_SMALL)
    return save_hub_layout(parts, "v1", tmp_path_factory.mktemp("teacher"))[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 image-caption pairs in the image-folder layout (two steps of batch 4 per epoch)."""
    folder = tmp_path_factory.mktemp("data")
    write_metadata(folder, write_images(folder, 8))
    return folder


@pytest.fixture(scope="module")
def distilled(teacher, data, tmp_path_factory) -> Path:
    """A tiny student distilled for 30 steps from a teacher that first learnt to denoise these images.

    A random teacher's prediction is far from the noise, so the task loss and output KD pull the
    student apart and output KD rises. BK-SDM's teacher is a trained denoiser: so is this one, made by
    train.py itself (--variant sd, denoising loss only) and loaded from its checkpoint folder.
    """
    root = tmp_path_factory.mktemp("distilled")
    assert train.main(flags(teacher, data, root / "teacher", variant="sd", max_steps=30, log_steps=10,
                            lr=1e-3, lambda_out=0, lambda_feat=0)) == 0
    denoiser = root / "teacher" / "checkpoint-0000030"
    rows = log_rows(root / "teacher")
    assert rows[-1]["sd"] < 0.5 * rows[0]["sd"]  # it did learn to denoise
    assert train.main(flags(denoiser, data, root / "student", max_steps=30, log_steps=10, lr=1e-3)) == 0
    return root / "student"


@pytest.mark.slow  # `distilled` trains a teacher for 30 steps, then a student for 30
def test_distillation_lowers_every_loss(distilled):
    rows = log_rows(distilled)
    assert [r["step"] for r in rows] == [10, 20, 30]
    for key in LOSSES:
        first, last = rows[0][key], rows[-1][key]
        assert np.isfinite(last) and last < 0.8 * first, f"{key}: {first} -> {last}"
    assert rows[-1]["epoch"] == 14 and rows[-1]["skipped"] == 0  # 30 steps of 4 of 8 images: 15 epochs begun
    assert checkpoints(distilled) == [distilled / "checkpoint-0000030"]


@pytest.mark.slow
def test_log_rows_average_the_steps_they_cover(teacher, data, tmp_path):
    """A row is the mean over the steps since the previous row, also where fewer than --log-steps are."""
    assert train.main(flags(teacher, data, tmp_path / "each", max_steps=3, log_steps=1)) == 0
    assert train.main(flags(teacher, data, tmp_path / "pairs", max_steps=3, log_steps=2)) == 0
    each, pairs = log_rows(tmp_path / "each"), log_rows(tmp_path / "pairs")
    assert [r["step"] for r in pairs] == [2, 3]
    for key in ("loss", *LOSSES):
        assert pairs[0][key] == pytest.approx((each[0][key] + each[1][key]) / 2, rel=1e-6)
        assert pairs[1][key] == pytest.approx(each[2][key], rel=1e-6)


@pytest.mark.slow
def test_resume_is_exact(teacher, data, tmp_path):
    """5 steps in one go, or 3 then 5 in the same --out: the same losses after step 3 and the same weights.
    Batch 2 with 2 micro-batches per step over 8 images: step 3 stops mid-epoch, with an EMA too."""
    options = dict(batch_size=2, global_batch=4, log_steps=1, ema_decay=0.9, lr=1e-3)
    assert train.main(flags(teacher, data, tmp_path / "once", max_steps=5, **options)) == 0
    assert train.main(flags(teacher, data, tmp_path / "twice", max_steps=3, save_steps=3, **options)) == 0
    assert train.main(flags(teacher, data, tmp_path / "twice", max_steps=5, save_steps=3, **options)) == 0
    once, twice = log_rows(tmp_path / "once"), log_rows(tmp_path / "twice")
    assert [r["step"] for r in twice] == [1, 2, 3, 4, 5]  # resumed at 4, not restarted
    for a, b in zip(once[3:], twice[3:]):
        for key in ("loss", *LOSSES, "lr", "epoch", "skipped"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    end_once, end_twice = tmp_path / "once" / "checkpoint-0000005", tmp_path / "twice" / "checkpoint-0000005"
    for folder in ("unet", "ema_unet"):
        a, b = unet_weights(end_once, folder), unet_weights(end_twice, folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    state_once, state_twice = read_training_state(end_once), read_training_state(end_twice)
    assert (state_once["epoch"],
            state_once["position"]) == (state_twice["epoch"], state_twice["position"]) == (2, 4)
    # --resume takes a checkpoint from another run folder
    middle = tmp_path / "twice" / "checkpoint-0000003"
    assert train.main(flags(teacher, data, tmp_path / "branch", max_steps=5, resume=middle, **options)) == 0
    a, b = unet_weights(end_once), unet_weights(tmp_path / "branch" / "checkpoint-0000005")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit) as exit_:
        train.main(flags(teacher, data, tmp_path / "x", max_steps=5, resume=tmp_path / "nothing", **options))
    assert exit_.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_resumes(teacher, data, tmp_path, sig):
    """Ctrl-C (or a scheduler's SIGTERM) reaches the whole process group, DataLoader workers included:
    the run finishes its step, saves it and exits cleanly; a re-run goes on from there."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"),
               *flags(teacher, data, out, max_steps=100_000, num_workers=2)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)
        try:
            deadline = time.time() + 180
            while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip()):
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.time() < deadline, "no log line in 180 s"
                time.sleep(0.1)
            os.killpg(proc.pid, sig)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stopped = log_rows(out)[-1]["step"]
    assert stopped < 100_000
    assert checkpoints(out) == [out / f"checkpoint-{stopped:07d}"]
    assert f"stopped at step {stopped}: {out / f'checkpoint-{stopped:07d}'}; run the same command" in stdout
    assert read_training_state(checkpoints(out)[-1])["step"] == stopped

    assert train.main(flags(teacher, data, out, max_steps=stopped + 2)) == 0
    assert [r["step"] for r in log_rows(out)] == list(range(1, stopped + 3))


def test_signal_handlers_are_given_back(teacher, data, tmp_path):
    """train.main installs its stop handlers for the run only: a program that calls it (pytest here) gets its
    own SIGINT and SIGTERM handlers back when it returns."""
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    assert train.main(flags(teacher, data, tmp_path / "run", max_steps=1)) == 0
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == handlers


@pytest.mark.slow
def test_checkpoints_are_atomic_and_pruned(teacher, data, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, max_steps=4, save_steps=1, keep=2)) == 0
    assert checkpoints(out) == [out / "checkpoint-0000003", out / "checkpoint-0000004"]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-0000003", "checkpoint-0000004"]
    # A kill while step 5 was being saved leaves its temporary folder: the U-Net and half the state.
    tmp = out / ".tmp-checkpoint-0000005"
    shutil.copytree(out / "checkpoint-0000004" / "unet", tmp / "unet")
    state = (out / "checkpoint-0000004" / "training_state.pt").read_bytes()
    (tmp / "training_state.pt").write_bytes(state[: len(state) // 2])

    assert train.main(flags(teacher, data, out, max_steps=5, save_steps=1, keep=2)) == 0
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3, 4, 5]  # went on from checkpoint 4
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-0000004", "checkpoint-0000005"]
    last = out / "checkpoint-0000005"
    student, state = load_unet(last / "unet"), read_training_state(last)
    assert state["step"] == 5 and all(torch.isfinite(p).all() for p in student.parameters())


def test_bad_images_are_skipped_and_counted(teacher, tmp_path):
    """A truncated PNG, a truncated JPEG, random bytes and a missing file among 10 rows: each batch of 10
    (one epoch) trains on the 6 good ones, and `skipped` counts 4 per epoch, over two DataLoader workers."""
    folder = tmp_path / "data"
    names = write_images(folder, 7)
    png = (folder / names[6]).read_bytes()
    (folder / names[6]).write_bytes(png[: len(png) // 2])
    Image.open(folder / names[0]).save(folder / "cut.jpg", quality=95)
    jpeg = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    write_metadata(folder, names + ["cut.jpg", "noise.jpg", "missing.png"])

    out = tmp_path / "run"
    assert train.main(flags(teacher, folder, out, batch_size=10, global_batch=10, max_steps=2,
                            num_workers=2)) == 0
    rows = log_rows(out)
    assert [r["skipped"] for r in rows] == [4, 8]
    assert all(np.isfinite(r[key]) and r[key] > 0 for r in rows for key in ("sd", "feat"))
    assert checkpoints(out) == [out / "checkpoint-0000002"]


def test_nan_loss_stops_at_the_last_good_checkpoint(teacher, data, tmp_path, monkeypatch, capsys):
    """The loss turns NaN at step 4, a save step between two checks (every 3 steps): nothing is saved
    from NaN weights, and the run stops naming checkpoint 2."""
    calls = []

    def nan_from_step_4(losses, *weights):
        calls.append(1)
        loss = total_loss(losses, *weights)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr("minisd.kd_step.total_loss", nan_from_step_4)
    out = tmp_path / "run"
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    assert train.main(flags(teacher, data, out, max_steps=10, log_steps=3, save_steps=2)) == 1
    # given back on exit too
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == handlers
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: error:")]
    assert len(message) == 1, message  # on a line of its own, not after the progress bar
    assert "loss became non-finite (loss nan) by step 4" in message[0]
    assert str(out / "checkpoint-0000002") in message[0]
    assert checkpoints(out) == [out / "checkpoint-0000002"]
    student = load_unet(out / "checkpoint-0000002" / "unet")
    state = read_training_state(out / "checkpoint-0000002")
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in student.parameters())
    assert all(torch.isfinite(v).all() for group in state["optimizer"]["state"].values()
               for v in group.values() if torch.is_tensor(v))


def flat(model: torch.nn.Module) -> torch.Tensor:
    """A model's weights as one vector."""
    return torch.cat([v.flatten() for v in model.state_dict().values()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes on the CPU
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_gloo_processes_train_as_one(teacher, data, tmp_path, accumulation):
    """2 processes of batch 2 after 2 steps hold the weights of 1 process of batch 4 (global batch
    4, or 8 with 2 micro-batches per step, DDP syncing only the last): the same samples with the
    same noise (seeded per sample), gradients averaged by DDP."""
    options = dict(max_steps=2, lr=1e-3, global_batch=4 * accumulation)
    assert train.main(flags(teacher, data, tmp_path / "one", batch_size=4, **options)) == 0
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py"),
               *flags(teacher, data, tmp_path / "two", batch_size=2, **options)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", *LOSSES):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # Compared as whole vectors, not element by element: AdamW's first steps move every weight by about
    # +-lr whatever its gradient's size, so a gradient element within float rounding of 0 (a few in 10^5
    # here) may go either way. Ranks that trained apart (no all-reduce, or on the same samples) would
    # differ by about the size of the update itself.
    teacher_unet = load_unet(teacher / "unet")
    start = flat(student_from_teacher(teacher_unet, variant(teacher_unet.config, "tiny")))
    single, ddp = (flat(load_unet(tmp_path / run / "checkpoint-0000002" / "unet")) for run in ("one", "two"))
    assert (ddp - single).norm() <= 1e-5 * single.norm()
    assert (ddp - single).norm() <= 1e-3 * (single - start).norm()


@pytest.mark.slow  # needs `distilled`
def test_checkpoint_loads_in_sample_py_and_diffusers(distilled, tmp_path):
    checkpoint = distilled / "checkpoint-0000030"
    assert all((checkpoint / name).is_symlink() for name in ("vae", "text_encoder", "tokenizer", "scheduler"))
    png = tmp_path / "sample.png"
    assert sample_main(["a vase of roses", "--model", str(checkpoint), "--steps", "2", "--height", "32",
                        "--width", "32", "--out", str(png), "--no-progress"]) == 0
    assert Image.open(png).size == (32, 32)

    ours = load_unet(checkpoint / "unet")
    assert (not ours.config.mid and len(ours.config.stages) == 3
            and all(len(st.down) == 1 for st in ours.config.stages))
    theirs = UNet2DConditionModel.from_pretrained(checkpoint / "unet").eval()
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 96, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = ours(x, t, context)
        for unet in (theirs, pipe.unet):
            assert rel_diff(expected, unet(x, t, encoder_hidden_states=context).sample) < 1e-5
    # the whole pipeline too: the same image from minisd and diffusers
    mine = load_pipeline(checkpoint)("a vase of roses", steps=3, seed=0, height=32, width=32, progress=False,
                                     output="np")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a vase of roses", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     height=32, width=32, output_type="np").images
    assert np.abs(mine - reference).max() <= 2 / 255


def test_sd_student_starts_as_the_teacher(teacher, data, tmp_path):
    """--variant sd copies the teacher whole: step 1's KD losses, computed before its update, are 0."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, variant="sd", max_steps=2, log_steps=1)) == 0
    first, second = log_rows(out)
    assert first["out"] < 1e-12 and first["feat"] < 1e-12 and first["sd"] > 0.1
    assert second["out"] > 1e-12 and second["feat"] > 1e-12  # after one update it differs


def test_argument_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--variant", "tiny", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--data is required" in err and "metadata.csv" in err and "tar shards" in err
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(tmp_path), "--out", str(tmp_path), "--batch-size", "4", "--global-batch",
                    "6"])
    assert exit_.value.code == 2
    assert "--global-batch 6 is not a multiple of --batch-size x processes (4 x 1)" in capsys.readouterr().err


def test_min_snr_weighting_scales_only_the_denoising_loss(teacher, data, tmp_path, capsys):
    """--snr-gamma: step 1 (before any update) sees the same batch, timesteps and noise; the weights are at
    most 1 for an epsilon target, so its task loss can only fall, and the KD terms do not change."""
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    assert train.main(flags(teacher, data, plain, max_steps=1)) == 0
    assert train.main(flags(teacher, data, weighted, max_steps=1, snr_gamma=0.5)) == 0
    (a,), (b,) = log_rows(plain), log_rows(weighted)
    assert b["sd"] < a["sd"] and b["out"] == a["out"] and b["feat"] == a["feat"]
    with pytest.raises(SystemExit) as exit_:
        train.main(flags(teacher, data, tmp_path / "x", snr_gamma=0))
    assert exit_.value.code == 2 and "--snr-gamma: 0 is not a number > 0" in capsys.readouterr().err


@pytest.mark.slow  # needs `distilled`
def test_sample_grid_and_loss_plot(teacher, data, tmp_path, distilled):
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, max_steps=2, valid_steps=2)) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png"]
    assert Image.open(out / "samples" / "step-0000002.png").size == (4 * 32, 32)  # one row of the 4 prompts
    assert Image.open(out / "losses.png").size == (800, 480)
    assert not (distilled / "samples").exists() and (distilled / "losses.png").is_file()  # --valid-steps 0


@pytest.mark.slow
def test_plain_training_from_scratch(teacher, data, tmp_path):
    """--plain --unet-config: a new, narrower U-Net from random weights on the denoising loss alone."""
    config = json.loads((teacher / "unet" / "config.json").read_text())
    config.update(block_out_channels=[16, 32, 32, 32])
    (tmp_path / "unet.json").write_text(json.dumps(config))
    out = tmp_path / "plain"
    assert train.main(flags(teacher, data, out, unet_config=tmp_path / "unet.json", max_steps=20,
                            log_steps=10, lr=1e-3, batch_size=4, global_batch=8) + ["--plain"]) == 0
    rows = log_rows(out)
    assert all(r["out"] == 0.0 and r["feat"] == 0.0 for r in rows)
    assert rows[-1]["sd"] < rows[0]["sd"]
    pipe = load_pipeline(out / "checkpoint-0000020")
    assert [s.channels for s in pipe.unet.config.stages] == [16, 32, 32, 32]
    with pytest.raises(SystemExit):
        train.main(flags(teacher, data, tmp_path / "x", unet_config=tmp_path / "unet.json"))


def test_loss_plot_leaves_out_terms_that_are_zero_throughout(tmp_path):
    """A --plain run logs out = feat = 0: on the log-scale plot they would squash the denoising loss into a
    flat line at the top, so only the terms with a value are drawn (their colours are in the image, the others
    not)."""
    def colours(rows):
        plot_losses(rows, tmp_path / "losses.png")
        pixels = np.asarray(Image.open(tmp_path / "losses.png").convert("RGB")).reshape(-1, 3)
        return {tuple(c) for c in np.unique(pixels, axis=0)}

    orange, green, blue = (255, 165, 0), (0, 128, 0), (0, 0, 255)
    plain = [{"step": s, "loss": 1 / s, "sd": 1 / s, "out": 0.0, "feat": 0.0} for s in range(1, 30)]
    found = colours(plain)
    assert blue in found and orange not in found and green not in found
    kd = [dict(row, out=0.5 / row["step"], feat=2 / row["step"]) for row in plain]
    assert {blue, orange, green} <= colours(kd)


# ---- faults that must not lose work (the data set's images, a full disk, another run in the same --out)


def test_huge_lr_saves_nothing_and_names_no_good_checkpoint(teacher, data, tmp_path, capsys):
    """--lr 1e30: the loss of step 1 is computed before its update, so it is finite, but the weights it leaves
    are not healthy: no checkpoint is written from them, and none is called good."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, lr=1e30, save_steps=1, max_steps=3)) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "not saved" in lines[0] and "none (none saved yet)" in lines[0], lines
    assert checkpoints(out) == [] and not list(out.glob(".tmp-checkpoint-*"))


# a full disk as each writer reports it: the OS; safetensors (in 0.8's words); torch.save's zip writer
FULL_DISK = {
    "os": lambda folder: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)),
    "safetensors": lambda folder: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
    "torch.save": lambda folder: RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 447\nPytorchStreamWriter failed "
        "writing file data/0: file write failed"),
}


def no_space_left(times: int, real, writer: str = "os"):
    """A stand-in for save_unet that fails with a full disk `times` times, then saves."""
    calls = []

    def save(model, folder):
        calls.append(folder)
        if len(calls) <= times:
            raise FULL_DISK[writer](folder)
        real(model, folder)
    return save


@pytest.mark.parametrize("writer", list(FULL_DISK))
def test_a_failed_save_is_retried_at_the_next(teacher, data, tmp_path, capsys, monkeypatch, writer):
    """The disk is full at step 1's save: the run says so, keeps its state in memory, and step 2's save is
    the retry that works. No temporary folder is left behind."""
    monkeypatch.setitem(training.SAVE, "unet", no_space_left(1, training.SAVE["unet"], writer))
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, save_steps=1, max_steps=2)) == 0
    err = capsys.readouterr().err
    assert "could not save checkpoint-0000001" in err and "kept in memory" in err
    if writer == "torch.save":
        assert "PytorchStreamWriter failed writing file data/0: file write failed" in err
    else:
        assert "No space left on device" in err and "free some space" in err
    assert checkpoints(out) == [out / "checkpoint-0000002"] and not list(out.glob(".tmp-checkpoint-*"))


def test_a_second_failed_save_stops_the_run(teacher, data, tmp_path, capsys, monkeypatch):
    """Step 1 is saved; then the disk is full for good: step 2's save fails, its retry at the end fails too,
    and the run stops naming checkpoint 1."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, save_steps=1, max_steps=1)) == 0
    monkeypatch.setitem(training.SAVE, "unet", no_space_left(99, training.SAVE["unet"]))
    assert train.main(flags(teacher, data, out, save_steps=1, max_steps=2)) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "again" in lines[0], lines
    assert str(out / "checkpoint-0000001") in lines[0]
    assert checkpoints(out) == [out / "checkpoint-0000001"] and not list(out.glob(".tmp-checkpoint-*"))


def test_a_bug_while_saving_is_not_taken_for_a_full_disk(teacher, data, tmp_path, monkeypatch):
    """Only write failures are retried: any other error while saving is raised as it is."""
    def broken(model, folder):
        raise RuntimeError("a bug")
    monkeypatch.setitem(training.SAVE, "unet", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train.main(flags(teacher, data, tmp_path / "run", save_steps=1, max_steps=1))


def test_out_holding_another_run_is_refused_unless_overwrite(teacher, data, tmp_path, capsys):
    """A first run that stopped before its first checkpoint still left its shared parts and log: a different
    run in the same --out is refused, naming the difference; --overwrite starts it afresh."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, max_steps=1, resolution=32)) == 0
    with pytest.raises(SystemExit) as exit_:
        train.main(flags(teacher, data, out, max_steps=2, resolution=64))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "resolution 32 there, 64 here" in err and "--overwrite" in err
    assert train.main(flags(teacher, data, out, max_steps=1, resolution=64) + ["--overwrite"]) == 0
    assert [r["step"] for r in log_rows(out)] == [1]  # the old run's rows are gone with it
    assert json.loads((out / "run.json").read_text())["resolution"] == 64


def test_resumed_run_logs_each_step_once(teacher, data, tmp_path):
    """A kill after step 3 was logged but before it was saved: the re-run goes on from checkpoint 2, and the
    log keeps one row per step."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, max_steps=3, save_steps=2)) == 0
    shutil.rmtree(out / "checkpoint-0000003")
    assert train.main(flags(teacher, data, out, max_steps=3, save_steps=2)) == 0
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3]


def test_a_run_goes_on_whether_its_paths_are_relative_or_absolute(teacher, data, tmp_path, monkeypatch):
    """The same teacher and data named from another folder, or relative to this one, are the same run."""
    out = tmp_path / "run"
    assert train.main(flags(teacher, data, out, max_steps=2, save_steps=2)) == 0
    monkeypatch.chdir(tmp_path)
    relative = flags(os.path.relpath(teacher), os.path.relpath(data), Path("run"), max_steps=3, save_steps=3)
    assert train.main(relative) == 0
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3]  # went on from step 2


def test_no_usable_image_stops_instead_of_spinning(teacher, tmp_path):
    """Every image unreadable: a whole epoch gives no batch, and the run stops with a message (it used to
    spin forever, deaf to Ctrl-C). Run as a process, so that a regression fails by timeout, not a hang."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"not an image")
    write_metadata(folder, [f"{i}.png" for i in range(4)])
    command = [sys.executable, str(ROOT / "train.py"), *flags(teacher, folder, tmp_path / "run", batch_size=2,
                                                              global_batch=2)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train.py: error: a whole pass over the data gave no batch of 2 usable images" in done.stderr
