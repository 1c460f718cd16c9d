"""The tiny VAE (TAESD) against diffusers' AutoencoderTiny on random weights: encode and decode, both
checkpoint layouts (diffusers' folder and TAESD's own taesd_encoder/taesd_decoder files), and whole
images of a pipeline that decodes (and, for img2img, encodes) with it, same seed, same image."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as Reference
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from reference import (
    VAE_SMALL,
    perturb_,
    reduced_config,
    reference_parts,
    rel_diff,
    save_hub_layout,
    text_config,
)
from safetensors.torch import load_file, save_file

import minisd
from minisd.checkpoints.remap import CheckpointError
from minisd.checkpoints.taesd import load_taesd, load_vae_tiny, save_vae_tiny
from minisd.images import read_settings
from minisd.pipeline import load_vae
from minisd.vae_tiny import TAESD, AutoencoderTiny, TinyVAEConfig
from sample import main as sample_main

# TAESD's shape at 1/8 of the width and fewer blocks: the same layer positions logic, milliseconds to run
SMALL = dict(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
             num_encoder_blocks=[1, 2, 2, 2], num_decoder_blocks=[2, 2, 2, 1])
PROMPT = "a black vase holding a bouquet of roses"
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def reference() -> Reference:
    torch.manual_seed(0)
    return perturb_(Reference(**SMALL)).eval()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("taesd")
    reference.save_pretrained(path)
    return path


def outputs(vae, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if isinstance(vae, Reference):
            return vae.encode(images).latents, vae.decode(latents).sample
        return vae.encode(images), vae.decode(latents)


def check_same(vae, reference) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 48, 64, generator=gen) * 2 - 1
    latents = 2 * torch.randn(2, 4, 6, 8, generator=gen)
    for ours, theirs in zip(outputs(vae, images, latents), outputs(reference, images, latents)):
        assert ours.shape == theirs.shape and rel_diff(theirs, ours) <= 1e-5


def test_taesd_shape_and_parameters():
    with torch.device("meta"):
        ref, ours = Reference(), AutoencoderTiny(TAESD)
    for half in ("encoder", "decoder"):
        count = sum(p.numel() for p in getattr(ours, half).parameters())
        assert count == sum(p.numel() for p in getattr(ref, half).parameters())
        assert count == (1_222_532 if half == "encoder" else 1_222_531)
    assert TinyVAEConfig.from_diffusers(dict(Reference().config)) == TAESD
    assert (TAESD.downscale, TAESD.scaling_factor) == (8, 1.0)


def test_diffusers_folder_parity(folder, reference):
    vae = load_vae_tiny(folder)
    assert vae.config.encoder_blocks == (1, 2, 2, 2) and vae.config.decoder_channels == 8
    check_same(vae, reference)
    assert isinstance(load_vae(folder), AutoencoderTiny)


def test_save_loads_in_diffusers(folder, reference, tmp_path):
    save_vae_tiny(load_vae_tiny(folder), tmp_path)
    check_same(Reference.from_pretrained(tmp_path).eval(), reference)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_taesd_files(folder, reference, tmp_path, suffix):
    """TAESD's own files, made from diffusers' weights by the rule of diffusers' conversion script
    (scripts/convert_tiny_autoencoder_to_diffusers.py): encoder positions as they are, decoder positions one
    up (TAESD's decoder starts with its Clamp)."""
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    halves = {"encoder": {}, "decoder": {}}
    for key, tensor in weights.items():
        half, _, position, rest = key.split(".", 3)
        halves[half][f"{int(position) + (half == 'decoder')}.{rest}"] = tensor
    for half, state_dict in halves.items():
        path = tmp_path / f"taesd_{half}{suffix}"
        if suffix == ".pth":
            torch.save(state_dict, path)
        else:
            save_file(state_dict, path)
    vae = load_taesd(tmp_path)
    check_same(vae, reference)
    assert isinstance(load_vae(tmp_path), AutoencoderTiny)


def test_strict_and_bad_folders(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no VAE"):
        load_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="no VAE folder"):
        load_vae(tmp_path / "none")
    config = (folder / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"num_decoder_blocks": [\n    2,',
                                                         '"num_decoder_blocks": [\n    3,'))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing keys"):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="act_fn"):
        TinyVAEConfig.from_diffusers({"act_fn": "silu"})


# ---- in the pipeline -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes(folder, reference, tmp_path_factory):
    parts = reference_parts("v1", reduced_config("v1", "tiny"), text_config("v1", 96, 2, 4), VAE_SMALL,
                            seed=5)
    _, path = save_hub_layout(parts, "v1", tmp_path_factory.mktemp("sd"))
    ref = StableDiffusionPipeline.from_pretrained(path, vae=reference)
    ref.set_progress_bar_config(disable=True)
    return ref, minisd.load_pipeline(path, vae=folder), path


def test_pipeline_image_with_tiny_vae(pipes):
    ref, pipe, _ = pipes
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae_scale == 8
    ours = pipe(PROMPT, steps=3, seed=2, height=64, width=64, progress=False, output="np")
    theirs = ref(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(2), height=64,
                 width=64, output_type="np").images
    assert np.abs(ours - theirs).max() <= TOLERANCE and ours.std() > 0.01


def test_img2img_encodes_with_tiny_vae(pipes):
    ref, pipe, _ = pipes
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    ours = pipe(PROMPT, steps=4, seed=3, height=64, width=64, init_image=init, strength=0.5, progress=False,
                output="np")
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img(PROMPT, image=init, strength=0.5, num_inference_steps=4,
                     generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_pipeline_with_tiny_vae_saves_for_diffusers(pipes, tmp_path):
    ref, pipe, _ = pipes
    pipe.save(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(again.vae).__name__ == "AutoencoderTiny"
    assert isinstance(minisd.load_pipeline(tmp_path / "saved").vae, AutoencoderTiny)
    with pytest.raises(ValueError, match="single file holds SD's KL autoencoder"):
        pipe.save_single_file(tmp_path / "one.safetensors")


def test_sample_py_vae(pipes, folder, tmp_path):
    _, _, path = pipes
    out = tmp_path / "tiny.png"
    assert sample_main([PROMPT, "--model", str(path), "--vae", str(folder), "--steps", "2", "--height", "32",
                        "--width", "32", "--no-progress", "--out", str(out)]) == 0
    assert read_settings(out)["vae"] == str(folder) and Image.open(out).size == (32, 32)
