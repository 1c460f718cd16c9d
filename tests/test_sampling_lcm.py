"""Few-step sampling, same seed, same image: minisd's LCM sampler in the pipeline against diffusers'
LatentConsistencyModelPipeline (an LCM U-Net with a guidance embedding, no CFG pass) and against
StableDiffusionPipeline with LCMScheduler (a plain U-Net, as an LCM-LoRA is sampled), on random weights."""

import copy

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from reference import VAE_SMALL, reduced_config, reference_parts, save_hub_layout, text_config

import minisd
from minisd.images import read_settings
from sample import main as sample_main

PROMPT = "a black vase holding a bouquet of roses"
TOLERANCE = 2 / 255  # per pixel, images in [0, 1]


def images(ref, steps, seed, size, **kwargs) -> np.ndarray:
    return ref(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
               height=size, width=size, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A reduced BK-SDM-Tiny U-Net with LCM's guidance embedding, saved as a diffusers folder."""
    unet_cfg = dict(reduced_config("v1", "tiny"), time_cond_proj_dim=32)
    parts = reference_parts("v1", unet_cfg, text_config("v1", 96, 2, 4), VAE_SMALL, seed=3)
    with torch.no_grad():
        parts["unet"].time_embedding.cond_proj.weight.mul_(20)  # w moves the image well past the tolerance
    return save_hub_layout(parts, "v1", tmp_path_factory.mktemp("lcm"))[1]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    parts = reference_parts("v1", reduced_config("v1", "tiny"), text_config("v1", 96, 2, 4), VAE_SMALL,
                            seed=4)
    ref, path = save_hub_layout(parts, "v1", tmp_path_factory.mktemp("plain"))
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref, minisd.load_pipeline(path)


def test_lcm_unet_same_image_as_diffusers_lcm_pipeline(lcm_folder):
    ref = LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                         requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = minisd.load_pipeline(lcm_folder)
    assert pipe.unet.config.guidance_embed_dim == 32
    kwargs = dict(steps=4, seed=5, height=32, width=32, scheduler="lcm", progress=False, output="np")
    ours = pipe(PROMPT, guidance=8.5, **kwargs)
    assert np.abs(ours - images(ref, 4, 5, 32, guidance_scale=8.5)).max() <= TOLERANCE
    # the guidance weight is an input of the U-Net: another w, another image
    assert np.abs(pipe(PROMPT, guidance=3.0, **kwargs) - ours).mean() > 0.01
    # diffusers' StableDiffusionPipeline makes the same decision for such a U-Net: w embedding, no CFG
    sd = StableDiffusionPipeline.from_pretrained(lcm_folder, scheduler=ref.scheduler, safety_checker=None,
                                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    assert np.abs(ours - images(sd, 4, 5, 32, guidance_scale=8.5)).max() <= TOLERANCE


def test_lcm_unet_runs_the_unet_once_per_step(lcm_folder, monkeypatch):
    """No CFG pass with a guidance embedding: one U-Net call per step, on the images' batch alone."""
    pipe = minisd.load_pipeline(lcm_folder)
    batches = []
    forward = type(pipe.unet).forward
    def counted(self, x, *args, **kwargs):
        batches.append(len(x))
        return forward(self, x, *args, **kwargs)
    monkeypatch.setattr(type(pipe.unet), "forward", counted)
    pipe(PROMPT, steps=4, guidance=8.5, height=32, width=32, num_images=2, scheduler="lcm", progress=False,
         output="latent")
    assert batches == [2, 2, 2, 2]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_plain_unet_with_lcm_sampler_same_image(plain, guidance):
    """A U-Net without guidance embedding (an LCM-LoRA merged into it, say), sampled as diffusers'
    StableDiffusionPipeline does with LCMScheduler: CFG when guidance > 1, none at 1."""
    ref, pipe = plain
    ours = pipe(PROMPT, steps=4, seed=6, guidance=guidance, height=32, width=32, scheduler="lcm",
                negative_prompt="blurry", progress=False, output="np")
    theirs = images(ref, 4, 6, 32, guidance_scale=guidance, negative_prompt="blurry")
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_sample_py_lcm(lcm_folder, tmp_path, capsys):
    out = tmp_path / "lcm.png"
    assert sample_main([PROMPT, "--model", str(lcm_folder), "--scheduler", "lcm", "--steps", "4", "--height",
                        "32", "--width", "32", "--no-progress", "--out", str(out)]) == 0
    settings = read_settings(out)
    assert settings["scheduler"] == "lcm" and settings["steps"] == "4" and settings["guidance"] == "7.5"


def test_default_guidance(lcm_folder, plain):
    """7.5, SD's, unless the LCM sampler runs a U-Net without guidance embedding (an LCM-LoRA): 1, no CFG."""
    _, pipe = plain
    assert [pipe.default_guidance(name) for name in (None, "lcm", "ddim")] == [7.5, 1.0, 7.5]
    assert minisd.load_pipeline(lcm_folder).default_guidance("lcm") == 7.5


def test_lcm_loop_never_reads_the_device(lcm_folder):
    """The guidance weight's embedding and the LCM steps on the meta device, where reading a value raises (a
    host-device sync on a GPU; tests/test_speed.py runs every sampler so on a plain U-Net)."""
    meta = copy.deepcopy(minisd.load_pipeline(lcm_folder)).to("meta")
    latents = meta(["a", "b"], steps=4, guidance=8.5, height=32, width=32, scheduler="lcm",
                   seed_mode="per_image", progress=False, output="latent")
    assert latents.device.type == "meta" and latents.shape == (2, 4, 16, 16)
