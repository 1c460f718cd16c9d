"""Latent consistency distillation (minisd/lcd_step.py, train_lcm.py) on the toy model: one step's loss equals
a hand computation from the LCM paper's formulas on the same draws, a run resumes exactly, the full form ends
as a pipeline that samples with LCM, and an LCM-LoRA made by minisd gives diffusers' image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

import train_lcm
from minisd.checkpoints.diffusers import save_unet
from minisd.data import collate
from minisd.distill import student_from_teacher
from minisd.lcd_step import LCDRecipe, lcd_draws, lcd_step
from minisd.pipeline import load_pipeline
from minisd.schedulers import NoiseSchedule
from minisd.table import variant
from minisd.toy.dataset import write_dataset
from minisd.training import open_data
from minisd.unet import UNet, with_guidance_embedding

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "toy-sd"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lcm")
    write_dataset(root / "toy", n=8, seed=5, heldout=0.0, workers=1)
    return root / "toy" / "train"


def flags(data: Path, out: Path, **options) -> list[str]:
    settings = dict(teacher=TOY, data=data, out=out, resolution=64, batch_size=2, max_steps=4, log_steps=1,
                    save_steps=2, valid_steps=0, num_workers=0, lr=1e-4, guidance_embed_dim=16)
    settings.update(options)
    return [arg for k, v in settings.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def test_lcd_loss_is_the_hand_computation(scenes, toy_each_schedule):
    """Written out from the LCM paper (Algorithm 1, eq. 9) and the consistency models' boundary scalings, on
    the draws lcd_step makes: the teacher's guided DDIM step, the target's and the student's consistency
    functions, the pseudo-Huber distance; for an epsilon teacher, and for a v-prediction one on a zero
    terminal SNR schedule (where x at t = 999 is pure noise and x0 = -v)."""
    pipe = load_pipeline(toy_each_schedule)
    student = with_guidance_embedding(pipe.unet, 16)
    target = UNet(student.config)
    target.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in student.state_dict().items()})
    batch = collate([open_data(str(scenes), 64, 2)[i] for i in (0, 1)])
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    recipe = LCDRecipe()
    with torch.no_grad():
        uncond = pipe.text_encoder(pipe.tokenizer([""]))
        got = lcd_step(batch, pipe, pipe.unet, student, target, schedule, uncond, recipe)["loss"]

        posterior = pipe.vae.encode(batch["pixels"])
        index, noise, eps, w = lcd_draws(batch["seed"], posterior.mean.shape[1:], recipe)
        z = (posterior.mean + posterior.std * eps) * pipe.vae.scaling_factor
        context = pipe.text_encoder(pipe.tokenizer(batch["text"]))
        a = schedule.alphas_cumprod.double()
        start = 20 * index + 19  # the skipping schedule: 19, 39, ..., 999
        end = (start - 20).clamp(min=0)

        def col(v):
            return v.double().reshape(-1, 1, 1, 1)

        x = col(a[start]).sqrt() * z.double() + (1 - col(a[start])).sqrt() * noise.double()

        def x0_eps(out, x, t):  # the model's output -> (x0, eps)
            out, signal, noise_scale = out.double(), col(a[t]).sqrt(), (1 - col(a[t])).sqrt()
            if schedule.prediction_type == "v_prediction":  # v = signal eps - noise_scale x0
                return signal * x - noise_scale * out, signal * out + noise_scale * x
            return (x - noise_scale * out) / signal, out

        def f(model, x, t):
            s = 10.0 * t.double()
            c_skip, c_out = 0.25 / (s**2 + 0.25), s / (s**2 + 0.25).sqrt()
            return col(c_skip) * x + col(c_out) * x0_eps(model(x.float(), t, context, w=w), x, t)[0]

        (x0_cond, eps_cond), (x0_free, eps_free) = (
            x0_eps(pipe.unet(x.float(), start, c), x, start) for c in (context, uncond.expand_as(context)))
        x0_guided = x0_cond + col(w) * (x0_cond - x0_free)
        eps_guided = eps_cond + col(w) * (eps_cond - eps_free)
        x_prev = col(a[end]).sqrt() * x0_guided + (1 - col(a[end])).sqrt() * eps_guided
        d = f(student, x, start) - f(target, x_prev, end)
        expected = ((d**2 + 0.001**2).sqrt() - 0.001).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    assert ((start >= 19) & (start <= 999)).all() and ((w >= 3) & (w <= 15)).all()


@pytest.mark.slow
def test_full_lcd_resumes_exactly_and_samples_with_lcm(scenes, tmp_path):
    """4 steps in one go, or 2 then 4: the same losses, student and EMA target. The run folder is then a
    pipeline whose U-Net has the guidance embedding and whose scheduler is LCM's."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert train_lcm.main(flags(scenes, once)) == 0
    assert train_lcm.main(flags(scenes, twice, max_steps=2)) == 0
    assert train_lcm.main(flags(scenes, twice)) == 0
    rows = [[json.loads(line) for line in open(run / "log.jsonl")] for run in (once, twice)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    for folder in ("unet", "checkpoint-0000004/unet", "checkpoint-0000004/ema_unet"):
        a, b = (load_file(run / folder / "diffusion_pytorch_model.safetensors") for run in (once, twice))
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    # the shipped U-Net is the EMA target
    final, ema = (load_file(once / f / "diffusion_pytorch_model.safetensors")
                  for f in ("unet", "checkpoint-0000004/ema_unet"))
    assert all(torch.equal(final[k], ema[k]) for k in final)

    pipe = load_pipeline(once)
    assert pipe.unet.config.guidance_embed_dim == 16
    scheduler = json.loads((once / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    image = pipe("a red circle", steps=4, seed=0, progress=False, output="np")
    assert np.isfinite(image).all() and image.std() > 0.01


@pytest.mark.slow
def test_full_lcd_of_a_smaller_student_on_the_teachers_trajectories(scenes, tmp_path):
    """--student: the learning network starts from a BK-SDM-Tiny student of the toy teacher (its VAE and text
    encoder), the teacher takes the guided solver steps, and the result is the student's U-Net with the
    guidance embedding."""
    teacher = load_pipeline(TOY)
    tiny = student_from_teacher(teacher.unet, variant(teacher.unet.config, "tiny"))
    student = tmp_path / "tiny"
    shutil.copytree(TOY, student)
    shutil.rmtree(student / "unet")
    save_unet(tiny, student / "unet")
    out = tmp_path / "lcm"
    assert train_lcm.main([*flags(scenes, out, max_steps=2), "--student", str(student)]) == 0
    pipe = load_pipeline(out)
    assert pipe.unet.config.guidance_embed_dim == 16
    assert pipe.unet.config.name != teacher.unet.config.name  # the tiny table, not the teacher's
    learned = sum(p.numel() for p in pipe.unet.parameters())
    embedding = sum(p.numel() for n, p in pipe.unet.named_parameters() if "guidance" in n)
    assert learned - embedding == sum(p.numel() for p in tiny.parameters())
    image = pipe("a red circle", steps=4, seed=0, progress=False, output="np")
    assert np.isfinite(image).all() and image.std() > 0.01
    # a re-run with another --student is another run
    with pytest.raises(SystemExit) as refused:
        train_lcm.main(flags(scenes, out, max_steps=4))
    assert refused.value.code == 2


@pytest.mark.slow
def test_lcm_lora_gives_diffusers_image(scenes, tmp_path):
    """--lora: the file loads in sample.py's pipeline and in diffusers (StableDiffusionPipeline with
    LCMScheduler and load_lora_weights), which draw the same 4-step image."""
    out = tmp_path / "lora"
    assert train_lcm.main(flags(scenes, out, max_steps=2) + ["--lora", "--rank", "4", "--alpha", "4"]) == 0
    assert not (out / "unet").exists()
    ups = [v for k, v in load_file(out / "pytorch_lora_weights.safetensors").items() if "lora_B" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)  # it learnt: up starts at zero
    mine = load_pipeline(TOY)
    mine.load_lora(out)
    image = mine("a red circle", steps=4, guidance=1.0, seed=0, scheduler="lcm", progress=False, output="np")

    pipe = StableDiffusionPipeline.from_pretrained(TOY, safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), height=64, width=64, output_type="np").images
    assert np.abs(image - reference).max() <= 2 / 255
