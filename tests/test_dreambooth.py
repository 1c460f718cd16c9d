"""dreambooth.py on the toy model (weights/toy-sd): DreamBooth's loss with prior preservation equals a hand
computation, the text encoder learns only when asked, class images are made resumably, a run resumes exactly,
and the folder it ends with is a pipeline that sample.py and diffusers load."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import dreambooth
from minisd.dreambooth import PriorPreservation, collate_pairs, make_class_images, prompted_folder
from minisd.kd_step import KDRecipe, kd_step, per_sample_noise
from minisd.pipeline import load_pipeline
from minisd.schedulers import NoiseSchedule
from minisd.toy.dataset import write_dataset
from sample import main as sample_main

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "toy-sd"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """5 toy scenes as the subject's photos, and 3 as ready-made class images."""
    root = tmp_path_factory.mktemp("photos")
    write_dataset(root / "toy", n=8, seed=3, heldout=0.0, workers=1)
    for folder, names in (("instance", range(5)), ("class", range(5, 8))):
        (root / folder).mkdir()
        for i in names:
            shutil.copy(root / "toy" / "train" / f"{i:06d}.png", root / folder / f"{i:06d}.png")
    return root


def flags(photos: Path, out: Path, **options) -> list[str]:
    settings = dict(model=TOY, instance_data=photos / "instance", instance_prompt="a sks shape",
                    class_prompt="a shape", class_data=photos / "class", num_class_images=3, max_steps=4,
                    lr=1e-4, log_steps=1, save_steps=2, num_workers=0, out=out)
    settings.update(options)
    return [arg for k, v in settings.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def test_prior_preservation_loss_is_the_sum_of_the_halves(photos, toy_each_schedule):
    """One batch of 2 instance + 2 class samples through kd_step equals DreamBooth's loss computed by hand
    from the same noise and timesteps: the instance half's MSE + 0.5 x the class half's (against the noise,
    or for a v-prediction model against v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0)."""
    pipe = load_pipeline(toy_each_schedule)
    instance = prompted_folder(photos / "instance", "a sks shape", "--instance-data", 64, True, 0)
    prior = prompted_folder(photos / "class", "a shape", "--class-data", 64, True, 1)
    pairs = PriorPreservation(instance, prior)
    batch = collate_pairs([pairs[0, 0], pairs[0, 4]], prior_loss_weight=0.5)
    assert batch["text"] == ["a sks shape"] * 2 + ["a shape"] * 2
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    with torch.no_grad():
        got = kd_step(batch, pipe, None, pipe.unet, schedule, [], KDRecipe())["loss"]

        posterior = pipe.vae.encode(batch["pixels"])
        shape = posterior.mean.shape[1:]
        t, noise, eps = per_sample_noise(batch["seed"], shape, schedule.num_train_timesteps)
        latents = (posterior.mean + posterior.std * eps) * pipe.vae.scaling_factor
        context = pipe.text_encoder(pipe.tokenizer(batch["text"]))
        prediction = pipe.unet(schedule.add_noise(latents, noise, t), t, context)
        target = noise
        if schedule.prediction_type == "v_prediction":
            alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    expected = F.mse_loss(prediction[:2], target[:2]) + 0.5 * F.mse_loss(prediction[2:], target[2:])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # instance image i goes with class image i mod 3, over max(5, 3) samples
    assert len(pairs) == 5 and pairs[0, 4][1]["pixels"].equal(pairs[0, 1][1]["pixels"])


def test_class_images_are_made_resumably(photos, tmp_path):
    """Missing class images are generated, image i from seed + i: a re-run after one was lost makes only that
    one, with the same pixels up to one level of rounding (its batch of 1 computes in another order than the
    first run's batch of 3, and some CPUs round a pixel differently for it)."""
    calls = []

    def load():
        calls.append(1)
        return load_pipeline(TOY)

    folder = tmp_path / "class"
    assert make_class_images(load, "a red circle", folder, 3, seed=7, steps=2, guidance=3.0, size=64,
                             progress=False) == 3
    first = np.asarray(Image.open(folder / "class-00001.png"))
    (folder / "class-00001.png").unlink()
    assert make_class_images(load, "a red circle", folder, 3, seed=7, steps=2, guidance=3.0, size=64,
                             progress=False) == 1
    again = np.asarray(Image.open(folder / "class-00001.png"))
    assert np.abs(again.astype(int) - first).max() <= 1 and (again != first).mean() < 0.01
    assert make_class_images(load, "a red circle", folder, 3, seed=7, steps=2, guidance=3.0, size=64,
                             progress=False) == 0
    assert len(calls) == 2  # the pipeline loads only when an image is missing
    assert Image.open(folder / "class-00000.png").text["prompt"] == "a red circle"


@pytest.mark.slow
def test_resume_is_exact_and_the_run_ends_as_a_pipeline(photos, tmp_path):
    """4 steps in one go, or 2 then 4: the same log rows and weights (U-Net and text encoder). The run folder
    then loads in sample.py and diffusers, which draw the same image."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert dreambooth.main(flags(photos, once)) == 0
    assert dreambooth.main(flags(photos, twice, max_steps=2)) == 0
    assert dreambooth.main(flags(photos, twice)) == 0
    rows = [[json.loads(line) for line in open(run / "log.jsonl")] for run in (once, twice)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a, b = (load_file(run / part / f"{name}.safetensors") for run in (once, twice))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    start = load_file(TOY / "text_encoder" / "model.safetensors")
    trained = load_file(once / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # it learnt

    png = tmp_path / "sks.png"
    assert sample_main(["a sks shape", "--model", str(once), "--steps", "3", "--out", str(png),
                        "--no-progress"]) == 0
    mine = load_pipeline(once)("a sks shape", steps=3, seed=0, progress=False, output="np")
    pipe = StableDiffusionPipeline.from_pretrained(once, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a sks shape", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     height=64, width=64, output_type="np").images
    assert np.abs(mine - reference).max() <= 2 / 255


def test_frozen_text_encoder_stays_as_it_was(photos, tmp_path):
    """--no-train-text-encoder without prior preservation: only the U-Net learns; the checkpoint links the
    model's text encoder."""
    out = tmp_path / "run"
    assert dreambooth.main(flags(photos, out, max_steps=1) + ["--no-train-text-encoder",
                                                              "--no-with-prior-preservation"]) == 0
    assert (out / "checkpoint-0000001" / "text_encoder").is_symlink()
    start = load_file(TOY / "text_encoder" / "model.safetensors")
    after = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(start[k], after[k]) for k in start)
    unet_start = load_file(TOY / "unet" / "diffusion_pytorch_model.safetensors")
    unet_after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_start[k], unet_after[k]) for k in unet_start)


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_its_file_loads_in_diffusers(photos, tmp_path):
    """--lora (BK-SDM's LoRA recipe, 1e-4): 4 steps in one go, or 2 then 4, give the same LoRA; its file
    (diffusers' layout, with the U-Net and text-encoder LoRA) draws the same image in minisd and in diffusers'
    load_lora_weights, and the kohya export gives minisd the same image again."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    lora = ["--lora", "--export-kohya"]
    assert dreambooth.main(flags(photos, once) + lora) == 0
    assert dreambooth.main(flags(photos, twice, max_steps=2) + lora) == 0
    assert dreambooth.main(flags(photos, twice) + lora) == 0
    a, b = (load_file(run / "pytorch_lora_weights.safetensors") for run in (once, twice))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("unet.") for k in a) and any(k.startswith("text_encoder.") for k in a)
    assert not (once / "unet").exists()  # the model's own weights are not written: they did not change

    settings = dict(steps=3, seed=0, progress=False, output="np")
    mine = load_pipeline(TOY)
    mine.load_lora(once)
    image = mine("a sks shape", **settings)
    plain = load_pipeline(TOY)("a sks shape", **settings)
    assert np.abs(image - plain).max() > 2 / 255  # the LoRA changes the image
    kohya = load_pipeline(TOY)
    kohya.load_lora(once / "lora-kohya.safetensors")
    assert np.abs(kohya("a sks shape", **settings) - image).max() <= 1 / 255

    pipe = StableDiffusionPipeline.from_pretrained(TOY, safety_checker=None, torch_dtype=torch.float32)
    pipe.load_lora_weights(once)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a sks shape", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     height=64, width=64, output_type="np").images
    assert np.abs(image - reference).max() <= 2 / 255
