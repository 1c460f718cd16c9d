"""DINO's ViT against transformers' ViTModel: preprocessing, layouts, CLS output.

The reference is transformers' ViTModel with random weights (every 1-d parameter perturbed, and the class
token and position embeddings too), saved by transformers in the hub layout (`facebook/dino-vits16`'s) and
loaded through `load_dino`, the path real weights take. The original layout (`dino_deitsmall16_pretrain.pth`)
is written here by renaming the hub keys by hand (fusing q, k, v into qkv), so the loader's rule tables are
checked against names written out independently of them.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import perturb_, rel_diff
from safetensors.torch import load_file
from torchvision import transforms
from transformers import ViTConfig, ViTModel

from minisd.clip_vision import VIT_L14
from minisd.metrics import dino_hub_layout
from minisd.metrics.dino import DINO, DINO_VITS16, IMAGENET_MEAN, IMAGENET_STD
from minisd.metrics.dino_weights import load_dino, locate

# 64-wide heads as every DINO ViT has them: the original layout has no config, and the loader counts on it
SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
         "image_size": 32, "patch_size": 8}
# The original layout's names for each hub name (facebookresearch/dino, vision_transformer.py)
ORIGINAL_NAMES = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                  "embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}
ORIGINAL_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2",
                  "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
                  "output.dense": "mlp.fc2"}


def images() -> list[Image.Image]:
    """Noise of several sizes and aspects (above and below 256 px), a ramp, and other modes."""
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
             for w, h in [(256, 256), (300, 200), (200, 300), (224, 224), (640, 427), (57, 80)]]
    ramp = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)
    return noise + [Image.fromarray(ramp), noise[1].convert("L"), noise[2].convert("RGBA")]


def eval_transform():
    """DINO's eval_linear.py transform."""
    return transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_vit(config: dict, seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    model = perturb_(ViTModel(ViTConfig(**config))).eval()
    with torch.no_grad():
        for p in (model.embeddings.cls_token, model.embeddings.position_embeddings):
            p.add_(0.1 * torch.randn_like(p))
    return model


def original_layout(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub-layout tensors under the original DINO names, q, k and v fused into one qkv."""
    out = {}
    for key, tensor in hub.items():
        stem, _, kind = key.rpartition(".")
        if stem in ORIGINAL_NAMES or key in ORIGINAL_NAMES:
            out[ORIGINAL_NAMES.get(key) or f"{ORIGINAL_NAMES[stem]}.{kind}"] = tensor
        elif stem.startswith("encoder.layer."):
            _, _, i, rest = stem.split(".", 3)
            if rest.startswith("attention.attention."):
                if rest.endswith("query"):
                    parts = [hub[f"encoder.layer.{i}.attention.attention.{n}.{kind}"]
                             for n in ("query", "key", "value")]
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
                continue
            out[f"blocks.{i}.{ORIGINAL_BLOCK[rest]}.{kind}"] = tensor
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(reference, hub folder written by transformers, original-layout .pth) of a small ViT."""
    folder = tmp_path_factory.mktemp("dino")
    reference = reference_vit(SMALL)
    reference.save_pretrained(folder / "hub")
    torch.save(original_layout(load_file(folder / "hub" / "model.safetensors")), folder / "original.pth")
    return reference, folder / "hub", folder / "original.pth"


def test_preprocess_equals_dinos_eval_transform():
    transform = eval_transform()
    with torch.device("meta"):
        model = DINO()
    for image in images():
        ours, theirs = model.preprocess([image])[0], transform(image.convert("RGB"))
        assert torch.equal(ours, theirs), (image.size, image.mode, (ours - theirs).abs().max().item())


def test_preset_is_dino_vits16():
    with torch.device("meta"):
        model = DINO()
    assert sum(p.numel() for p in model.parameters()) == 21_665_664  # vit_small, patch 16: 21.7M
    assert DINO_VITS16.layer_norm_eps == 1e-6 and DINO_VITS16.heads * 64 == DINO_VITS16.width
    with pytest.raises(ValueError, match="no projection"):
        DINO(VIT_L14)  # CLIP's tower is not a DINO


def test_hub_layout_equals_vitmodel(small):
    reference, hub, _ = small
    ours = load_dino(hub)
    assert ours.config.layer_norm_eps == 1e-12  # the hub config's, as transformers reads it
    pixels = ours.preprocess(images())[:, :, :32, :32].contiguous()  # the small ViT takes 32 px
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 0]
        assert rel_diff(expected, ours.encode_image(pixels)) < 1e-5
        # another size: the position embeddings resized as transformers resizes them
        other = torch.randn(2, 3, 48, 40)
        expected = reference(pixel_values=other, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        assert rel_diff(expected, ours(other, interpolate_positions=True)) < 1e-5
        with pytest.raises(ValueError, match="must be 32x32"):
            ours(other)


def test_original_layout_gives_the_same_model(small, tmp_path):
    """The .pth in DINO's names loads the same tensors; the outputs differ only by the LayerNorm eps (DINO's
    1e-6, the hub config's 1e-12). A full training checkpoint's teacher loads alike."""
    reference, hub, original = small
    from_hub, from_original = load_dino(hub), load_dino(original)
    assert from_original.config.layer_norm_eps == 1e-6
    assert from_original.config == dataclasses.replace(from_hub.config, layer_norm_eps=1e-6)
    hub_state, original_state = from_hub.state_dict(), from_original.state_dict()
    assert hub_state.keys() == original_state.keys()
    assert all(torch.equal(hub_state[k], original_state[k]) for k in hub_state)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(from_hub(pixels), from_original(pixels)) < 1e-4
    full = {"teacher": {f"module.backbone.{k}": v for k, v in torch.load(original).items()}
            | {"module.head.last_layer.weight": torch.zeros(4, 128)}, "epoch": 100}
    torch.save(full, tmp_path / "full_checkpoint.pth")
    teacher = load_dino(tmp_path / "full_checkpoint.pth").state_dict()
    assert all(torch.equal(teacher[k], original_state[k]) for k in original_state)


def test_errors_name_the_problem(small, tmp_path):
    reference, hub, original = small
    config = json.loads((hub / "config.json").read_text())
    with pytest.raises(ValueError, match="qkv_bias=false"):
        dino_hub_layout.config_from_transformers({**config, "qkv_bias": False})
    with pytest.raises(FileNotFoundError, match="DINO weights not found"):
        locate(tmp_path / "none.pth")
    state = torch.load(original)
    del state["blocks.1.norm2.bias"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"(?s)1 missing.*blocks\.1\.norm2\.bias"):
        load_dino(tmp_path / "cut.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an original DINO ViT checkpoint"):
        load_dino(tmp_path / "other.pth")


@pytest.mark.slow  # ViT-S/16 at its real size, twice, and two 87 MB files
def test_real_size_equals_vitmodel_from_both_layouts(tmp_path):
    """facebook/dino-vits16's architecture with random weights: the CLS output of the same images after the
    same preprocessing (torchvision's, for transformers) within 1e-4, from the hub layout and from the
    original one."""
    # as facebook/dino-vits16's config.json, which leaves the eps at ViTConfig's 1e-12
    config = {**dino_hub_layout.config_to_transformers(DINO_VITS16), "layer_norm_eps": 1e-12}
    reference = reference_vit(config, seed=3)
    reference.save_pretrained(tmp_path / "hub")
    torch.save(original_layout(load_file(tmp_path / "hub" / "model.safetensors")),
               tmp_path / "dino_deitsmall16_pretrain.pth")
    transform = eval_transform()
    pil = images()[:6]
    from_hub = load_dino(tmp_path / "hub")
    from_original = load_dino(tmp_path / "dino_deitsmall16_pretrain.pth")
    assert from_original.config == DINO_VITS16
    with torch.no_grad():
        pixels = torch.stack([transform(im.convert("RGB")) for im in pil])
        expected = reference(pixel_values=pixels).last_hidden_state[:, 0]
        assert rel_diff(expected, from_hub.encode_image(from_hub.preprocess(pil))) < 1e-4
        assert rel_diff(expected, from_original.encode_image(from_original.preprocess(pil))) < 1e-4
