"""Same seed, same image: minisd's pipeline and sample.py against diffusers' StableDiffusionPipeline
and StableDiffusionImg2ImgPipeline on the same random weights (docs/sampling.md, "Same seed, same image")."""

import copy
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from reference import (
    VAE_FULL,
    VAE_SMALL,
    real_config,
    reduced_config,
    reference_parts,
    save_hub_layout,
    text_config,
)

import minisd
from minisd.images import read_settings
from sample import main as sample_main

PROMPT, OTHER = "a black vase holding a bouquet of roses", "an astronaut riding a horse on the moon"
DIFFUSERS_SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
                        "euler_a": EulerAncestralDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
TOLERANCE = 2 / 255  # per pixel, images in [0, 1]


def reference_images(ref, prompt, steps, seed, size, **kwargs) -> np.ndarray:
    generator = [torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list) \
        else torch.Generator("cpu").manual_seed(seed)
    return ref(prompt, num_inference_steps=steps, generator=generator, height=size, width=size,
               output_type="np", **kwargs).images


def build(tmp_path_factory, family, unet_cfg, text_cfg, vae_cfg, prediction_type="epsilon", seed=0):
    parts = reference_parts(family, unet_cfg, text_cfg, vae_cfg, seed=seed)
    folder = tmp_path_factory.mktemp(family)
    _, path = save_hub_layout(parts, family, folder, prediction_type=prediction_type)
    # diffusers reads the same folder: switching schedulers then sees the same config keys as minisd
    ref = StableDiffusionPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return ref, minisd.load_pipeline(path), path


@pytest.fixture(scope="module")
def sd_v1(tmp_path_factory):
    """A reduced SD-v1 pipeline (1/8-width U-Net, 2-layer CLIP, 2-level VAE)."""
    return build(tmp_path_factory, "v1", reduced_config("v1", "sd"), text_config("v1", 96, 2, 4), VAE_SMALL)


@pytest.mark.slow
def test_full_size_sd_v1_same_image(tmp_path_factory):
    """Real SD-v1 sizes (U-Net 0.86B, CLIP ViT-L/14, VAE) at 128 px, 4 PNDM steps."""
    ref, pipe, path = build(tmp_path_factory, "v1", real_config("v1", "sd"), text_config("v1", 768, 12, 12),
                            VAE_FULL)
    shutil.rmtree(path)
    kwargs = dict(steps=4, seed=0, height=128, width=128, negative_prompt="blurry", progress=False,
                  output="np")
    ours = pipe(PROMPT, **kwargs)
    theirs = reference_images(ref, PROMPT, 4, 0, 128, negative_prompt="blurry")
    assert np.abs(ours - theirs).max() <= TOLERANCE
    # the text path is really used: another prompt gives another image
    assert np.abs(pipe(OTHER, **kwargs) - ours).mean() > 0.01


@pytest.mark.slow
def test_v2_v_prediction_same_image(tmp_path_factory):
    ref, pipe, _ = build(tmp_path_factory, "v2", reduced_config("v2", "sd"), text_config("v2", 128, 2, 4),
                         VAE_SMALL, prediction_type="v_prediction", seed=1)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    ours = pipe([PROMPT, OTHER], steps=5, seed=3, height=64, width=64, guidance=5.0, progress=False,
                output="np")
    theirs = reference_images(ref, [PROMPT, OTHER], 5, 3, 64, guidance_scale=5.0)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    assert np.abs(ours[0] - ours[1]).mean() > 0.01


@pytest.mark.slow
def test_bk_tiny_same_image(tmp_path_factory):
    ref, pipe, _ = build(tmp_path_factory, "v1", reduced_config("v1", "tiny"), text_config("v1", 96, 2, 4),
                         VAE_SMALL, seed=2)
    assert pipe.unet.config.mid is False and len(pipe.unet.config.stages) == 3
    ours = pipe(PROMPT, steps=6, seed=11, height=48, width=48, num_images=2, progress=False, output="np")
    theirs = reference_images(ref, PROMPT, 6, 11, 48, num_images_per_prompt=2)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULERS))
def test_every_sampler_same_image(sd_v1, name):
    ref, pipe, _ = sd_v1
    ref.scheduler = DIFFUSERS_SCHEDULERS[name].from_config(ref.scheduler.config)
    ours = pipe(PROMPT, steps=6, seed=4, height=64, width=64, scheduler=name, progress=False, output="np")
    theirs = reference_images(ref, PROMPT, 6, 4, 64)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_no_guidance_skips_unconditional_pass(sd_v1):
    ref, pipe, _ = sd_v1
    ref.scheduler = PNDMScheduler.from_config(ref.scheduler.config)
    ours = pipe(PROMPT, steps=4, seed=0, height=64, width=64, guidance=1.0, progress=False, output="np")
    assert np.abs(ours - reference_images(ref, PROMPT, 4, 0, 64, guidance_scale=1.0)).max() <= TOLERANCE


@pytest.mark.slow
def test_per_image_seeds(sd_v1):
    """seed_mode='per_image' is diffusers with one generator per image, and independent of the batch."""
    ref, pipe, _ = sd_v1
    # Euler ancestral draws from the generators at every step too
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    kwargs = dict(steps=5, height=64, width=64, scheduler="euler_a", seed_mode="per_image", progress=False,
                  output="np")
    batch = pipe([PROMPT, OTHER], seed=20, **kwargs)
    assert np.abs(batch - reference_images(ref, [PROMPT, OTHER], 5, [20, 21], 64)).max() <= TOLERANCE
    alone = pipe(OTHER, seed=21, **kwargs)
    assert np.abs(batch[1] - alone[0]).max() <= 1e-5


@pytest.mark.slow
def test_img2img_same_image(sd_v1):
    ref, pipe, _ = sd_v1
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.scheduler = PNDMScheduler.from_config(ref.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img(PROMPT, image=init, strength=0.6, num_inference_steps=10, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(9)).images
    ours = pipe(PROMPT, init_image=init, strength=0.6, steps=10, seed=9, height=64, width=64, progress=False,
                output="np")
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_guidance_rescale_same_image(sd_v1):
    """CFG rescale (Lin et al. 2023, sec. 3.4) as diffusers' guidance_rescale computes it, at a scale high
    enough for the rescale to matter."""
    ref, pipe, _ = sd_v1
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    kwargs = dict(steps=4, seed=6, height=64, width=64, guidance=12.0, scheduler="ddim", progress=False,
                  output="np")
    ours = pipe(PROMPT, guidance_rescale=0.7, **kwargs)
    theirs = reference_images(ref, PROMPT, 4, 6, 64, guidance_scale=12.0, guidance_rescale=0.7)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    assert np.abs(ours - pipe(PROMPT, **kwargs)).max() > 10 * TOLERANCE  # it changes the image
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        pipe(PROMPT, guidance_rescale=1.5)


def test_bad_settings_are_refused(sd_v1):
    _, pipe, _ = sd_v1
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPT, height=63, width=64)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        pipe(PROMPT, steps=0)


@pytest.mark.slow
def test_sample_py_writes_pngs_with_settings(sd_v1, tmp_path, capsys):
    _, pipe, path = sd_v1
    out = tmp_path / "out" / "roses.png"
    code = sample_main([PROMPT, "--model", str(path), "--steps", "3", "--height", "64", "--width", "64",
                        "--num-images", "2", "--seed", "5", "--negative-prompt", "blurry",
                        "--scheduler", "ddim", "--out", str(out), "--no-progress"])
    assert code == 0
    files = [tmp_path / "out" / name for name in ("roses-00.png", "roses-01.png", "roses-grid.png")]
    assert all(f.is_file() for f in files)
    image = Image.open(files[1])
    assert image.text["prompt"] == PROMPT and image.text["seed"] == "5" and image.text["scheduler"] == "ddim"
    assert image.text["steps"] == "3" and image.text["guidance"] == "7.5" and image.text["model"] == str(path)
    expected = pipe(PROMPT, steps=3, height=64, width=64, num_images=2, seed=5, negative_prompt="blurry",
                    scheduler="ddim", progress=False)
    assert np.array_equal(np.asarray(image), np.asarray(expected[1]))
    assert Image.open(files[2]).size == (128, 64)


def test_sample_py_errors_are_one_line(sd_v1, tmp_path, capsys, monkeypatch, caplog):
    _, _, path = sd_v1
    with pytest.raises(SystemExit) as exit_:
        sample_main([PROMPT, "--height", "100"])
    assert exit_.value.code == 2 and "--height must be a positive multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main([PROMPT, "--steps", "0"])
    assert "sample.py: error: argument --steps: 0 is not a whole number >= 1" in capsys.readouterr().err

    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert sample_main([PROMPT, "--model", str(path), "--init-image", str(tmp_path / "broken.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read init image" in err and "Traceback" not in err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sample_main([PROMPT, "--model", "nobody/no-such-model"]) == 2
    assert "cannot download 'nobody/no-such-model'" in capsys.readouterr().err
    assert sample_main([PROMPT, "--model", str(tmp_path / "missing")]) == 2
    assert "is not a file, a folder or a hub id" in capsys.readouterr().err

    long_prompt = " ".join(f"word{i}" for i in range(80))
    with caplog.at_level(logging.WARNING):
        assert sample_main([long_prompt, "--model", str(path), "--steps", "1", "--height", "32",
                            "--width", "32", "--out", str(tmp_path / "long.png"), "--no-progress"]) == 0
    # CLIP splits digits, and the dropped text is decoded as diffusers shows it ("word 7 9")
    assert "truncated after" in caplog.text and "dropped:" in caplog.text and "word 7 9" in caplog.text


def test_fp16_vae_overflow_is_decoded_again_in_fp32(sd_v1, monkeypatch):
    """SD's VAE decoder can overflow in fp16; the pipeline then decodes again in fp32."""
    pipe = copy.deepcopy(sd_v1[1])  # the VAE goes through fp16 here: keep the shared fixture as it is
    latents = torch.randn(1, 4, 32, 32)
    expected = pipe.decode(latents)
    decode = pipe.vae.decode

    def overflowing(z):  # an fp16 decode that overflows, as SD's VAE does on some images
        if z.dtype == torch.float16:
            return torch.full(expected.shape, float("inf"), dtype=torch.float16)
        return decode(z)

    monkeypatch.setattr(pipe.vae, "decode", overflowing)
    pipe.vae.half()
    images = pipe.decode(latents)
    # finite, and the fp32 image up to the fp16 rounding of the weights
    assert torch.isfinite(images).all() and torch.allclose(images, expected, atol=3e-3)
    assert pipe.vae_dtype == torch.float16  # handed back as it was


def test_components_in_different_dtypes(sd_v1):
    """train.py samples from an fp32 student with the teacher's bf16 text encoder and VAE."""
    pipe = copy.deepcopy(sd_v1[1])
    expected = pipe(PROMPT, steps=2, seed=0, height=32, width=32, progress=False, output="np")
    pipe.text_encoder.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)
    images = pipe(PROMPT, steps=2, seed=0, height=32, width=32, progress=False, output="np")
    assert np.isfinite(images).all() and np.abs(images - expected).mean() < 0.05  # bf16 rounding only


def test_sample_py_jpeg_keeps_its_settings(sd_v1, tmp_path):
    """A JPEG has no text chunks: the settings go into its EXIF (the prompt as ImageDescription, all of them
    as JSON in UserComment), and read back as a PNG's do."""
    _, _, path = sd_v1
    for out in (tmp_path / "roses.jpg", tmp_path / "roses.png"):
        assert sample_main([PROMPT, "--model", str(path), "--steps", "1", "--height", "32", "--width", "32",
                            "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    jpeg, png = read_settings(tmp_path / "roses.jpg"), read_settings(tmp_path / "roses.png")
    assert jpeg == png and jpeg["prompt"] == PROMPT and jpeg["seed"] == "3" and jpeg["steps"] == "1"
    assert Image.open(tmp_path / "roses.jpg").getexif()[0x010E] == PROMPT


def test_sample_py_warns_when_the_latents_are_not_finite(sd_v1, tmp_path, caplog):
    """A diverged checkpoint (weights ~1e30 or NaN) denoises to NaN and decodes to black: one warning line."""
    pipe = copy.deepcopy(sd_v1[1])
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save(tmp_path / "diverged")
    with caplog.at_level(logging.WARNING):
        assert sample_main([PROMPT, "--model", str(tmp_path / "diverged"), "--steps", "1", "--height", "32",
                            "--width", "32", "--num-images", "2", "--out", str(tmp_path / "x.png"),
                            "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "image(s) 0, 1 of 2 will be black" in warnings[0] and "NaN" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a healthy model gives no warning
        sd_v1[1](PROMPT, steps=1, height=32, width=32, progress=False)
    assert not caplog.records
