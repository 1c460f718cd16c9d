"""Parity of minisd's VAE with diffusers' AutoencoderKL at SD's real size, in both checkpoint layouts.

The reference has random weights with every norm parameter and every bias perturbed, so that a
key that is dropped or loaded into the wrong place changes the outputs.
"""

import shutil

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from minisd.checkpoints.diffusers import load_vae, save_vae
from minisd.checkpoints.files import read_json, write_state_dict
from minisd.checkpoints.ldm import vae_from_ldm, vae_to_ldm
from minisd.checkpoints.remap import CheckpointError
from minisd.vae import SD_VAE, AutoencoderKL, VAEConfig

SD_VAE_CONFIG = {  # stable-diffusion-v1-5/vae/config.json, and SD-v2's at sample_size 768
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 512, "in_channels": 3, "out_channels": 3, "act_fn": "silu",
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    err, scale = (actual - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    assert err <= 1e-4 * scale, f"{what}: max abs diff {err:.3g} at output scale {scale:.3g}"


@pytest.fixture(scope="module")
def reference() -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**SD_VAE_CONFIG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"images": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
            "latents": torch.randn(1, 4, 8, 8, generator=g)}


@pytest.fixture(scope="module")
def expected(reference, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        posterior = reference.encode(inputs["images"]).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(2))
        return {"mean": posterior.mean, "std": posterior.std, "kl": posterior.kl(), "sample": sample,
                "decoded": reference.decode(inputs["latents"]).sample}


@pytest.fixture(scope="module")
def vae(folder) -> AutoencoderKL:
    return load_vae(folder)


def check_outputs(model: AutoencoderKL, inputs, expected, what: str) -> None:
    with torch.no_grad():
        posterior = model.encode(inputs["images"])
        assert_close(posterior.mean, expected["mean"], f"{what}: posterior mean")
        assert_close(posterior.std, expected["std"], f"{what}: posterior std")
        assert_close(model.decode(inputs["latents"]), expected["decoded"], f"{what}: decode")


def test_config_and_size(reference, vae):
    assert VAEConfig.from_diffusers(dict(reference.config)) == SD_VAE == vae.config
    assert vae.scaling_factor == reference.config.scaling_factor == 0.18215
    n = sum(p.numel() for p in vae.parameters())
    assert n == sum(p.numel() for p in reference.parameters()) == 83_653_863
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**SD_VAE_CONFIG, "act_fn": "gelu"})


def test_diffusers_layout_parity(vae, inputs, expected):
    check_outputs(vae, inputs, expected, "load_vae")


def test_posterior_matches_diffusers(vae, inputs, expected):
    with torch.no_grad():
        posterior = vae.encode(inputs["images"])
    assert_close(posterior.sample(generator=torch.Generator().manual_seed(2)), expected["sample"], "sample")
    assert_close(posterior.kl(), expected["kl"], "kl")
    assert torch.equal(posterior.mode(), posterior.mean)


def test_save_vae_loads_in_diffusers(vae, reference, inputs, expected, tmp_path):
    save_vae(vae, tmp_path)
    assert read_json(tmp_path / "config.json")["_class_name"] == "AutoencoderKL"
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert reloaded.config.block_out_channels == reference.config.block_out_channels
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert_close(reloaded.decode(inputs["latents"]).sample, expected["decoded"],
                     "diffusers after save_vae")


def test_legacy_attention_names(vae, reference, folder, tmp_path):
    """Hub repos saved by older diffusers name the VAE attention query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, tensor in reference.state_dict().items():
        for new_name, old_name in old.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        legacy[key] = tensor
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    write_state_dict(tmp_path / "diffusion_pytorch_model.safetensors", legacy)
    loaded = load_vae(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], t) for k, t in vae.state_dict().items())


def test_single_file_layout(vae, reference, inputs, expected):
    ldm = vae_to_ldm(vae)
    # a 1x1 conv, as in real files
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    # LDM's up.0 runs last
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    # Checked from the other side: diffusers' own converter must give back exactly the reference's weights.
    converted = convert_ldm_vae_checkpoint(ldm, dict(reference.config))
    theirs = reference.state_dict()
    assert converted.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(converted[key].reshape(tensor.shape), tensor), key
    # A whole single file also holds the U-Net, text encoder and schedule: only the VAE's keys are read.
    whole = {**ldm, "model.diffusion_model.out.2.bias": torch.zeros(4), "alphas_cumprod": torch.ones(1000)}
    check_outputs(vae_from_ldm(whole), inputs, expected, "vae_from_ldm")


def test_strict_loading_names_bad_keys(reference, folder, tmp_path):
    sd = dict(reference.state_dict())
    del sd["decoder.up_blocks.1.resnets.2.norm1.bias"]
    sd["encoder.mid_block.attentions.0.extra.weight"] = torch.zeros(1)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    write_state_dict(tmp_path / "diffusion_pytorch_model.safetensors", sd)
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path)
    assert "decoder.up_blocks.1.resnets.2.norm1.bias" in str(err.value)
    assert "encoder.mid_block.attentions.0.extra.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="first_stage_model"):
        vae_from_ldm({"model.diffusion_model.out.2.bias": torch.zeros(4)})
