"""Whole pipelines: `minisd.load_pipeline` on diffusers-layout folders (as the hub repos have
them), on single original-layout files (SD-v1, SD-v2, BK-SDM), and `pipe.save` back to both."""

import json
import shutil

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from PIL import Image
from reference import (
    PADS,
    SD_SCHEDULER,
    VAE_FULL,
    VAE_SMALL,
    hub_folder,
    real_config,
    reduced_config,
    reference_parts,
    rel_diff,
    save_hub_layout,
    text_config,
)
from safetensors.torch import save_file
from transformers import CLIPTokenizer

import minisd
from minisd.checkpoints import hub
from minisd.checkpoints.diffusers import load_text_encoder, load_unet, load_vae
from minisd.checkpoints.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from minisd.checkpoints.remap import CheckpointError
from minisd.convert import main as convert
from sample import main as sample_main


def assert_same_outputs(pipe: minisd.Pipeline, ref: dict,
                        prompts=("a black vase holding a bouquet of roses", "")):
    ids = pipe.tokenizer(list(prompts))
    if "tokenizer" in ref:
        expected = ref["tokenizer"](list(prompts), padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
        assert torch.equal(ids, expected)
    with torch.no_grad():
        context = ref["text_encoder"](ids).last_hidden_state
        assert rel_diff(context, pipe.text_encoder(ids)) <= 1e-4
        x = torch.randn(2, 4, 16, 16)
        assert rel_diff(ref["unet"](x, 500, context).sample, pipe.unet(x, 500, context)) <= 1e-4
        latents = torch.randn(1, 4, 8, 8)
        assert rel_diff(ref["vae"].decode(latents).sample, pipe.vae.decode(latents)) <= 1e-4
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        assert rel_diff(ref["vae"].encode(image).latent_dist.mean, pipe.vae.encode(image).mean) <= 1e-4


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory):
    """A reduced SD-v2 (v-prediction) pipeline in the exact hub layout."""
    parts = reference_parts("v2", reduced_config("v2", "sd"), text_config("v2", 128, 2, 4), VAE_SMALL)
    ref, folder = save_hub_layout(parts, "v2", tmp_path_factory.mktemp("v2"), prediction_type="v_prediction")
    return ref, folder


def test_diffusers_folder(v2_folder):
    ref, folder = v2_folder
    pipe = minisd.load_pipeline(folder)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction" and pipe.family == "v2"
    assert pipe.tokenizer.pad_token == "!"
    assert_same_outputs(pipe, dict(ref.components))


def test_save_loads_in_diffusers(v2_folder, tmp_path):
    ref, folder = v2_folder
    minisd.load_pipeline(folder).save(tmp_path / "out")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(again, name).state_dict(), getattr(ref, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert again.scheduler.config.prediction_type == "v_prediction"
    assert_same_outputs(minisd.load_pipeline(tmp_path / "out"), dict(again.components))


def test_folder_saved_by_transformers5(tmp_path):
    """A folder saved by current diffusers/transformers: unprefixed text keys, tokenizer.json only."""
    parts = reference_parts("v1", reduced_config("v1", "small"), text_config("v1", 96, 2, 4), VAE_SMALL,
                            seed=3)
    tokenizer = CLIPTokenizer.from_pretrained(hub_folder(tmp_path / "tok", PADS["v1"]))
    ref = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=PNDMScheduler(**SD_SCHEDULER),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "tokenizer" / "vocab.json").exists()
    assert_same_outputs(minisd.load_pipeline(tmp_path / "pipe"), dict(ref.components))


def single_file(parts: dict, family: str, tmp_path, **extra) -> dict:
    """An LDM single-file state dict built from the reference models, with the extras real files carry."""
    for name in ("unet", "vae", "text_encoder"):
        parts[name].save_pretrained(tmp_path / name)
    unet = load_unet(tmp_path / "unet")
    sd = {**unet_to_ldm(unet), **vae_to_ldm(load_vae(tmp_path / "vae")),
          **text_encoder_to_ldm(load_text_encoder(tmp_path / "text_encoder"), family)}
    for name in ("unet", "vae", "text_encoder"):
        shutil.rmtree(tmp_path / name)  # several GB at full size; the disk may be small
    # diffusers' own converter must read minisd's U-Net keys back to the reference weights
    converted = convert_ldm_unet_checkpoint(dict(sd), dict(parts["unet"].config))
    assert converted.keys() == parts["unet"].state_dict().keys()
    sd = {k: v.clone() for k, v in sd.items()}
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000),
               "model_ema.diffusion_modelconv_inweight": torch.zeros(1), "betas": torch.zeros(1000),
               "alphas_cumprod": torch.zeros(1000), "posterior_mean_coef1": torch.zeros(1000)}, **extra)
    return sd


@pytest.mark.slow
def test_single_file_sd_v1_full_size(tmp_path):
    """Real SD-v1 sizes: U-Net 0.86B, VAE, CLIP ViT-L/14; text keys without `text_model.`; safetensors."""
    parts = reference_parts("v1", real_config("v1", "sd"), text_config("v1", 768, 12, 12), VAE_FULL)
    sd = single_file(parts, "v1", tmp_path)
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in sd.items()}
    save_file(sd, tmp_path / "sd-v1.safetensors")
    del sd
    pipe = minisd.load_pipeline(tmp_path / "sd-v1.safetensors")
    (tmp_path / "sd-v1.safetensors").unlink()
    assert pipe.unet.config.name == "sd-v1" and pipe.scheduler_config["prediction_type"] == "epsilon"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert_same_outputs(pipe, parts)


@pytest.mark.slow
def test_single_file_bk_tiny_v2_ckpt(tmp_path):
    """An SD-v2 BK-tiny .ckpt with a `state_dict` wrapper: OpenCLIP-H text, variant and epsilon detected."""
    parts = reference_parts("v2", real_config("v2", "tiny"), text_config("v2", 1024, 23, 16), VAE_FULL,
                            seed=1)
    sd = single_file(parts, "v2", tmp_path)
    torch.save({"state_dict": sd, "global_step": 875000, "epoch": 3}, tmp_path / "bk-tiny-v2.ckpt")
    del sd
    pipe = minisd.load_pipeline(tmp_path / "bk-tiny-v2.ckpt")
    assert pipe.unet.config.name == "sd-v2-tiny" and pipe.scheduler_config["prediction_type"] == "epsilon"
    assert pipe.tokenizer.pad_token == "!" and not pipe.unet.config.upcast_attention
    assert_same_outputs(pipe, parts)

    # without SD-2-base's global step, a v2 file is the 768 v-prediction model (as diffusers decides)
    pipe.save_single_file(tmp_path / "again.safetensors")
    again = minisd.load_pipeline(tmp_path / "again.safetensors")
    assert again.scheduler_config["prediction_type"] == "v_prediction" and again.unet.config.upcast_attention
    epsilon = minisd.load_pipeline(tmp_path / "again.safetensors", prediction_type="epsilon")
    assert epsilon.unet.config.sample_size == 64


def test_single_file_rejects_foreign_keys(tmp_path):
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1),
               "transformer.h.0.weight": torch.zeros(1)},
              tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="transformer.h.0.weight"):
        minisd.load_pipeline(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_convert_round_trip(tmp_path, capsys):
    """`python -m minisd.convert`: hub folder -> single file -> folder keeps every weight (BK-tiny, real
    sizes)."""
    parts = reference_parts("v1", real_config("v1", "tiny"), text_config("v1", 768, 12, 12), VAE_FULL, seed=2)
    _, folder = save_hub_layout(parts, "v1", tmp_path)
    del parts
    assert convert([str(folder), str(tmp_path / "tiny.safetensors")]) == 0
    assert convert([str(tmp_path / "tiny.safetensors"), str(tmp_path / "back")]) == 0
    assert "wrote" in capsys.readouterr().out
    first, back = minisd.load_pipeline(folder), minisd.load_pipeline(tmp_path / "back")
    assert back.unet.config.name == "sd-v1-tiny"
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(first.tokenizer(["a black vase"]), back.tokenizer(["a black vase"]))
    assert convert([str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 2
    assert "is not a file, a folder or a hub id" in capsys.readouterr().err
    # sample.py takes the single file as --model
    assert sample_main(["a black vase", "--model", str(tmp_path / "tiny.safetensors"), "--steps", "1",
                        "--height", "64", "--width", "64", "--out", str(tmp_path / "s.png"),
                        "--no-progress"]) == 0
    assert Image.open(tmp_path / "s.png").text["model"] == str(tmp_path / "tiny.safetensors")


def test_hub_file_selection():
    files = ["model_index.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.bin",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "safety_checker/model.bin"]
    assert hub.select_files(files, half=False) == ["unet/diffusion_pytorch_model.safetensors",
                                                   "vae/diffusion_pytorch_model.bin",
                                                   "text_encoder/model.safetensors"]
    assert hub.select_files(files, half=True) == ["unet/diffusion_pytorch_model.fp16.safetensors",
                                                  "vae/diffusion_pytorch_model.bin",
                                                  "text_encoder/model.fp16.safetensors"]
    with pytest.raises(FileNotFoundError, match="no vae weights"):
        hub.select_files(["unet/diffusion_pytorch_model.safetensors"], half=False)
    assert hub.looks_like_hub_id("nota-ai/bk-sdm-small") and not hub.looks_like_hub_id("./weights/x")


def test_offline_hub_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "CACHE", tmp_path)
    with pytest.raises(ConnectionError, match="not in .*pass DIR"):
        hub.download("nota-ai/bk-sdm-tiny", cache_dir=tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file, a folder or a hub id"):
        minisd.load_pipeline("no/such/model/here")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae/, text_encoder/, tokenizer/, scheduler/"):
        minisd.load_pipeline(tmp_path)
    (tmp_path / "notes.txt").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="not a weight file"):
        minisd.load_pipeline(tmp_path / "notes.txt")


def test_unreachable_hub_fails_fast_and_names_the_toy_model(tmp_path, monkeypatch, capsys):
    """No network: one request, no retries, one line that also names the offline toy model (README's first
    command). The hub's address is made unreachable (a closed local port), so the test is the same online."""
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "CACHE", tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    code = sample_main(["a black vase holding a bouquet of roses", "--model", "nota-ai/bk-sdm-small",
                        "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, seconds
    assert err.count("\n") == 1 and err.startswith("sample.py: error: cannot download 'nota-ai/bk-sdm-small'")
    assert "--model weights/toy-sd" in err and "Retry" not in err
