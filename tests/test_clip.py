"""Parity of minisd's CLIP text encoder with transformers' CLIPTextModel: through the hub layout
(real `text_model.` keys and transformers 5's unprefixed ones) and through SD-v1/v2 single files,
which diffusers' own single-file converters check from the other side."""

import dataclasses

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from reference import perturb_, rel_diff
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel

from minisd.checkpoints.diffusers import (
    TEXT_RULES,
    load_text_encoder,
    save_text_encoder,
    with_text_model_prefix,
)
from minisd.checkpoints.files import write_json
from minisd.checkpoints.ldm import text_encoder_from_ldm, text_encoder_to_ldm
from minisd.checkpoints.remap import load_into
from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_H14, CLIPTextConfig, CLIPTextEncoder

# text_encoder/config.json as the hub has it: runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1
SD_V1_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD_V2_CONFIG = {**SD_V1_CONFIG, "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
                "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
# Full width, reduced depth for speed; the eos id transformers >= 4.31 writes, to cover the other
# pooling rule.
SD_V2_SMALL_CONFIG = {**SD_V2_CONFIG, "num_hidden_layers": 3, "bos_token_id": 49406, "eos_token_id": 49407}
V2_SMALL = dataclasses.replace(OPENCLIP_VIT_H14, layers=3, bos_token_id=49406, eos_token_id=49407)


class Reference:
    """A perturbed random transformers CLIPTextModel and its outputs on `token_ids()`."""

    def __init__(self, config: dict, seed: int):
        torch.manual_seed(seed)
        self.config = config
        self.model = perturb_(CLIPTextModel(HFTextConfig(**config)), seed).eval()
        self.state_dict = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            out = self.model(token_ids())
        self.hidden, self.pooled = out.last_hidden_state, out.pooler_output


@pytest.fixture(scope="module")
def ref_v1() -> Reference:
    return Reference(SD_V1_CONFIG, seed=0)


@pytest.fixture(scope="module")
def ref_v2() -> Reference:
    return Reference(SD_V2_SMALL_CONFIG, seed=1)


def token_ids() -> torch.Tensor:
    """Random tokens framed as the tokenizer frames them: bos, tokens, eos, padding (eos or "!")."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (3, 77), generator=gen)
    ids[:, 0] = 49406
    ids[0, 5:] = 49407                      # SD-v1 padding: eos repeated
    ids[1, 40], ids[1, 41:] = 49407, 0      # SD-v2 padding: "!"
    ids[2, 76] = 49407                      # a full-length prompt
    return ids


def assert_same(ours: CLIPTextEncoder, ref: Reference) -> None:
    ids = token_ids()
    with torch.no_grad():
        hidden = ours(ids)
        pooled = ours.pooled(ids, hidden)
    assert rel_diff(ref.hidden, hidden) <= 1e-4
    assert rel_diff(ref.pooled, pooled) <= 1e-4


def assert_same_weights(state_dict: dict[str, torch.Tensor], ref: Reference) -> None:
    """transformers-named weights (with or without `text_model.`) equal the reference's, key for key."""
    state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    state_dict.pop("embeddings.position_ids", None)
    assert state_dict.keys() == ref.state_dict.keys()
    assert all(torch.equal(v, ref.state_dict[k]) for k, v in state_dict.items())


def from_reference(ref: Reference, config: CLIPTextConfig) -> CLIPTextEncoder:
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
    return load_into(encoder, with_text_model_prefix(ref.state_dict), TEXT_RULES)


def test_presets_match_hub_configs():
    assert CLIPTextConfig.from_transformers(SD_V1_CONFIG) == CLIP_VIT_L14
    assert CLIPTextConfig.from_transformers(SD_V2_CONFIG) == OPENCLIP_VIT_H14
    assert CLIPTextConfig.from_transformers({"text_config": SD_V1_CONFIG}) == CLIP_VIT_L14
    for config in (CLIP_VIT_L14, OPENCLIP_VIT_H14, V2_SMALL):
        assert CLIPTextConfig.from_transformers(config.to_transformers()) == config
    with torch.device("meta"):
        encoders = [CLIPTextEncoder(c) for c in (CLIP_VIT_L14, OPENCLIP_VIT_H14)]
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == [123_060_480, 340_387_840]
    assert not any(list(e.buffers()) for e in encoders)  # nothing a meta-device build would leave unfilled


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_hub_layout(family, ref_v1, ref_v2, tmp_path):
    """A real hub repo (`text_model.` keys, a stale position_ids buffer) loads, and minisd's save
    loads back into transformers and minisd."""
    ref = ref_v1 if family == "v1" else ref_v2
    hub = tmp_path / "hub"
    hub.mkdir()
    hub_sd = {"text_model." + k: v for k, v in ref.state_dict.items()}
    hub_sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(hub_sd, hub / "model.safetensors")
    write_json(hub / "config.json", ref.config)
    ours = load_text_encoder(hub)
    assert ours.config == CLIPTextConfig.from_transformers(ref.config)
    assert_same(ours, ref)

    save_text_encoder(ours, tmp_path / "saved")
    assert all(k.startswith("text_model.") for k in load_file(tmp_path / "saved" / "model.safetensors"))
    back, info = CLIPTextModel.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_weights(back.state_dict(), ref)


def test_hub_layout_transformers5(ref_v2, tmp_path):
    """transformers 5 saves CLIPTextModel keys without `text_model.`; those load too, in any dtype."""
    ref_v2.model.save_pretrained(tmp_path)
    assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    assert_same(load_text_encoder(tmp_path), ref_v2)
    assert {p.dtype for p in load_text_encoder(tmp_path, dtype=torch.float16).parameters()} == {torch.float16}


def test_single_file_v1(ref_v1):
    ours = from_reference(ref_v1, CLIP_VIT_L14)
    ldm = text_encoder_to_ldm(ours, "v1")
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    # as real SD-v1 files: a stale buffer, and the other components' keys beside the text encoder's
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ldm["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    unprefixed = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in ldm.items()}
    for single_file in (ldm, unprefixed):
        # diffusers reads it as the reference
        assert_same_weights(convert_ldm_clip_checkpoint(single_file), ref_v1)
        assert_same(text_encoder_from_ldm(single_file, "v1"), ref_v1)


def test_single_file_v2(ref_v2):
    ours = from_reference(ref_v2, V2_SMALL)
    ldm = text_encoder_to_ldm(ours, "v2")
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in ldm
    assert "cond_stage_model.model.positional_embedding" in ldm
    assert not any("q_proj" in k for k in ldm)
    # diffusers reads it as the reference
    assert_same_weights(convert_open_clip_checkpoint(ref_v2.model, ldm), ref_v2)

    # A real SD-v2 file also holds OpenCLIP's last block, which SD does not run, text_projection and
    # logit_scale.
    width, gen = V2_SMALL.width, torch.Generator().manual_seed(2)
    unused = {"ln_1.weight": [width], "ln_1.bias": [width], "attn.in_proj_weight": [3 * width, width],
              "attn.in_proj_bias": [3 * width], "attn.out_proj.weight": [width, width],
              "attn.out_proj.bias": [width], "ln_2.weight": [width], "ln_2.bias": [width],
              "mlp.c_fc.weight": [4 * width, width], "mlp.c_fc.bias": [4 * width],
              "mlp.c_proj.weight": [width, 4 * width], "mlp.c_proj.bias": [width]}
    last = f"cond_stage_model.model.transformer.resblocks.{V2_SMALL.layers}."
    full = {**ldm, **{last + k: torch.randn(s, generator=gen) for k, s in unused.items()},
            "cond_stage_model.model.text_projection": torch.randn(width, width, generator=gen),
            "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
            "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}
    loaded = text_encoder_from_ldm(full, "v2", config=V2_SMALL)
    assert_same(loaded, ref_v2)
    assert text_encoder_to_ldm(loaded, "v2").keys() == ldm.keys()


def test_single_file_errors_name_keys():
    ours = CLIPTextEncoder(V2_SMALL)
    ldm = text_encoder_to_ldm(ours, "v2")
    del ldm["cond_stage_model.model.ln_final.bias"]
    with pytest.raises(ValueError, match="ln_final.bias"):
        text_encoder_from_ldm(ldm, "v2", config=V2_SMALL)
    with pytest.raises(ValueError, match="cond_stage_model.transformer."):
        text_encoder_from_ldm(ldm, "v1")
