"""LoRA (minisd/lora.py) and LoRA files (minisd/checkpoints/lora_*.py): LoRALinear and LoRAConv2d by
hand, merging and removing exactly, and files in diffusers' and kohya's layouts against diffusers on
random-weight SD-v1 and SD-v2 models (docs/sampling.md, "LoRA")."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.peft_utils import get_peft_kwargs
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from PIL import Image
from reference import VAE_SMALL, reduced_config, reference_parts, rel_diff, save_hub_layout, text_config
from safetensors.torch import load_file, save_file
from torch import nn

import minisd
from minisd.checkpoints.lora_files import open_lora, read_lora, write_lora
from minisd.checkpoints.remap import CheckpointError
from minisd.clip import CLIPTextConfig, CLIPTextEncoder
from minisd.lora import (
    LoRAConv2d,
    LoRALinear,
    LowRank,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from minisd.table import Stage, UNetTable
from minisd.unet import UNet
from sample import main as sample_main

PROMPTS = ["a black vase holding a bouquet of roses", ""]
TOLERANCE = 2 / 255  # per pixel, images in [0, 1]


# ---- LoRALinear and injection ------------------------------------------------------------------------------

def test_lora_linear_by_hand():
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, rank=1, alpha=3.0)  # scale alpha / rank = 3
    x = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.equal(layer(x), base(x))  # up starts at zero: the layer starts as the base
    with torch.no_grad():
        layer.down.weight.copy_(torch.tensor([[1.0, 2.0, 0.0]]))  # down x = 1
        layer.up.weight.copy_(torch.tensor([[2.0], [-1.0]]))      # up (down x) = (2, -1)
    # base: (1 - 3 + 0.5, 4 - 6 - 0.5) = (-1.5, -2.5); plus 3 * (2, -1)
    assert layer(x).tolist() == [[4.5, -5.5]]
    layer.merge()
    assert layer.merged and layer(x).tolist() == [[4.5, -5.5]]
    assert base.weight.tolist() == [[7.0, 14.0, 3.0], [1.0, -1.0, 6.0]]  # W + 3 * up @ down
    layer.unmerge()
    assert base.weight.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.down.weight, layer.up.weight]


@pytest.mark.parametrize("stride", [1, 2])  # a ResBlock's conv, a downsampler's
def test_lora_conv_by_hand(stride):
    """A conv's update: down with the base's kernel, stride and padding, then a 1x1 up; merged, one conv whose
    weight is W + scale * up @ down."""
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    layer = LoRAConv2d(base, rank=2, alpha=4.0)  # scale 2
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(layer(x), base(x))
    down, up = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    with torch.no_grad():
        layer.down.weight.copy_(down), layer.up.weight.copy_(up)
        inner = nn.functional.conv2d(x, down, stride=stride, padding=1)
        by_hand = base(x) + 2.0 * nn.functional.conv2d(inner, up)
        assert rel_diff(layer(x), by_hand) <= 1e-6
        weight = base.weight.clone()
        layer.merge()
        merged = weight + 2.0 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        assert torch.allclose(base.weight, merged, atol=1e-6) and rel_diff(layer(x), by_hand) <= 1e-5
        layer.unmerge()
        assert torch.equal(base.weight, weight)
    assert layer.low_rank().down.shape == (2, 3, 3, 3) and layer.low_rank().up.shape == (5, 2, 1, 1)
    with pytest.raises(ValueError, match="plain convs only"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=2)


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, dropout=0.5)
    nn.init.normal_(layer.up.weight)
    x = torch.randn(4, 8)
    assert torch.equal(layer.eval()(x), layer(x)) and not torch.equal(layer.train()(x), layer.eval()(x))


TABLE = UNetTable("lora-test", (Stage(32, True, 2, (0, 1), (0, 1, 2)), Stage(64, True, 4, (0, 1), (0, 1, 2)),
                                Stage(64, False, 4, (0, 1), (0, 1, 2))), mid=True, context_dim=16, groups=8)
TEXT = CLIPTextConfig(width=16, layers=2, heads=2, mlp_width=32, vocab_size=100)


def randomize_lora_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every LoRA up weight random values: a fresh LoRA is zero and would prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def test_inject_merge_unmerge_remove():
    torch.manual_seed(0)
    unet, text = UNet(TABLE).eval(), CLIPTextEncoder(TEXT).eval()
    before = {key: {k: v.clone() for k, v in m.state_dict().items()} for key, m in (("u", unet), ("t", text))}
    x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        plain = unet(x, t, text(ids))

    # the BK-SDM recipe: to_q and to_v, which are minisd's names in both models (transformers' q_proj/v_proj)
    names = inject_lora(unet.requires_grad_(False), ["to_q", "to_v"], rank=4, alpha=27)
    inject_lora(text.requires_grad_(False), ["to_q", "to_v"], rank=2, alpha=17)
    assert len(names) == 2 * 2 * (2 + 2 + 1 + 3 + 3)  # (q, v) x (self, cross) x blocks (down, mid, up)
    assert "down.0.blocks.0.attn.transformer_blocks.0.attn2.to_v" in names
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == list(lora_state_dict(unet))
    with torch.no_grad():
        assert torch.equal(unet(x, t, text(ids)), plain)  # up is zero: nothing changes yet
    randomize_lora_(unet), randomize_lora_(text, seed=1)
    with torch.no_grad():
        context = text(ids)
        unmerged = unet(x, t, context)
        assert rel_diff(unmerged, plain) > 1e-2
        merge_lora(unet), merge_lora(text)
        assert rel_diff(text(ids), context) <= 1e-5 and rel_diff(unet(x, t, context), unmerged) <= 1e-5
    unmerge_lora(unet)
    assert all(torch.equal(v, before["u"][k.replace(".base.", ".")]) for k, v in unet.state_dict().items()
               if ".base." in k)
    layers = lora_layers(unet)
    assert layers[names[0]].alpha == 27 and layers[names[0]].rank == 4
    for model, key in ((unet, "u"), (text, "t")):  # text is still merged: remove unmerges first
        remove_lora(model)
        after = model.state_dict()
        assert after.keys() == before[key].keys()
        assert all(torch.equal(after[k], before[key][k]) for k in after)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_training_reaches_only_the_lora():
    """Gradients reach down and up alone, through activation checkpointing, with fp32 LoRA weights beside a
    bf16 model (the update is computed in fp32 and added in the model's dtype)."""
    torch.manual_seed(0)
    unet = UNet(TABLE).to(torch.bfloat16).requires_grad_(False)
    inject_lora(unet, ["to_q", "to_v"], rank=2, dtype=torch.float32)
    randomize_lora_(unet)
    unet.gradient_checkpointing = True
    x, context = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out = unet.train()(x, torch.tensor([10, 700]), context)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters()}
    lora = set(lora_state_dict(unet))
    assert all(grads[n].dtype == torch.float32 and grads[n].abs().sum() > 0 for n in lora)
    assert all(g is None for n, g in grads.items() if n not in lora)


def test_inject_names_no_layer():
    with pytest.raises(ValueError, match="no Linear or Conv2d layer of the model is named ...q_proj"):
        inject_lora(CLIPTextEncoder(TEXT), ["q_proj"], rank=2)


def test_low_rank_fits_convs_and_linears():
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    assert LowRank(down, up).fits(torch.Size([6, 8])) and LowRank(down, up).scale == 1.0
    conv = LowRank(down[:, :, None, None], up[:, :, None, None], alpha=4.0)  # a 1x1 conv's factors
    assert conv.fits(torch.Size([6, 8])) and conv.fits(torch.Size([6, 8, 1, 1])) and conv.scale == 2.0
    assert torch.equal(conv.delta(torch.Size([6, 8])), 2.0 * up @ down)
    assert not LowRank(down, up).fits(torch.Size([6, 7])) and not LowRank(down, up).fits(torch.Size([5, 8]))
    locon = LowRank(torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1))  # a 3x3 conv's, as LyCORIS' LoCon has
    assert locon.fits(torch.Size([4, 3, 3, 3])) and not locon.fits(torch.Size([4, 3]))


# ---- files against diffusers -------------------------------------------------------------------------------

def pattern_value(patterns: dict | None, name: str, default):
    """As peft's get_pattern_key: a pattern is a regex for the whole module name or a dotted tail of it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


@torch.no_grad()
def diffusers_merge(path, unet, text_encoder, scale: float = 1.0):
    """Merge a LoRA file into diffusers' models as diffusers' load_lora_weights + fuse_lora would, with peft's
    arithmetic written out in place of peft (which the tests do not need): diffusers' own reader (layout
    detection, kohya conversion, metadata), its key conversions and its LoraConfig arguments, then
    W += scale * (alpha / r) * B @ A per module, r and alpha by peft's rank_pattern/alpha_pattern lookup."""
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path),
                                                                           return_lora_metadata=True)

    def part(d: dict | None, prefix: str) -> dict:
        return {k.removeprefix(prefix): v for k, v in (d or {}).items() if k.startswith(prefix)}

    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        sd = part(state_dict, prefix + ".")
        if not sd:
            continue
        config, net_alphas = part(metadata, prefix + "."), part(alphas, prefix + ".")
        if prefix == "unet":  # diffusers.loaders.peft.load_lora_adapter
            sd = sd if "lora_A" in next(iter(sd)) else convert_unet_state_dict_to_peft(sd)
            ranks = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k}
        else:  # diffusers.loaders.lora_base._load_lora_into_text_encoder
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            if not hasattr(model, "text_model"):
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            ranks = {k: v.shape[1] for k, v in sd.items() if "lora_B" in k}
        config = config or get_peft_kwargs(ranks, net_alphas, sd, is_unet=prefix == "unet")
        modules = [k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")]
        assert len(sd) == 2 * len(modules), sorted(sd)
        for name in modules:
            r = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
            alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            weight = model.get_submodule(name).weight
            a, b = sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
            assert a.shape[0] == r, name
            factor = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            weight += scale * factor * (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)


def lora_like_peft(model: nn.Module, targets: list[str], ranks: dict[str, int], seed: int) -> dict:
    """What peft's get_peft_model_state_dict holds after model.add_adapter(LoraConfig(target_modules=targets,
    init_lora_weights=False)): lora_A/lora_B per targeted Linear or Conv2d (a conv's A is a conv of the
    layer's kernel, its B a 1x1 conv), here with random values and the rank of the target they end with."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for name, m in model.named_modules():
        target = next((t for t in targets if name.endswith("." + t)), None)
        if target is None or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        r, w = ranks[target], m.weight
        sd[f"{name}.lora_A.weight"] = 0.2 * torch.randn((r, *w.shape[1:]), generator=gen)
        sd[f"{name}.lora_B.weight"] = 0.2 * torch.randn((w.shape[0], r, *[1] * (w.ndim - 2)), generator=gen)
    return sd


# conv1: the ResBlocks' 3x3 convs (LoCon); proj_in: a 1x1 conv in SD-v1, a Linear in SD-v2
UNET_TARGETS = {"to_q": 4, "to_v": 4, "proj_in": 2, "conv1": 2}
# q/v as in BK-SDM's recipe, out_proj and fc1 as in kohya's files. Two limits of diffusers 0.42's kohya reader
# shape this: it reads the text encoder's attention layers only when out_proj is among them (its layout
# detection keys on to_out_lora), and it gives every text-encoder layer the most common alpha (its patterns
# for the others name no module), so the text encoder has one rank and one alpha here
TEXT_TARGETS = {"q_proj": 2, "v_proj": 2, "out_proj": 2, "fc1": 2}


@pytest.fixture(scope="module", params=["v1", "v2"])
def family(request, tmp_path_factory):
    """A reduced SD-v1 (CLIP, conv proj_in) or SD-v2 (OpenCLIP-style text tower, linear proj_in) pipeline in
    the hub layout, and a LoRA file for it made as diffusers' training scripts make one: peft's state dicts
    and LoraConfigs, written by StableDiffusionPipeline.save_lora_weights."""
    name = request.param
    width = 96 if name == "v1" else 128
    parts = reference_parts(name, reduced_config(name, "sd"), text_config(name, width, 2, 4), VAE_SMALL,
                            seed=5 if name == "v1" else 6)
    folder = tmp_path_factory.mktemp(f"lora-{name}")
    ref, path = save_hub_layout(parts, name, folder)
    unet_sd = lora_like_peft(ref.unet, list(UNET_TARGETS), UNET_TARGETS, seed=1)
    text_sd = lora_like_peft(ref.text_encoder, list(TEXT_TARGETS), TEXT_TARGETS, seed=2)
    # alphas as LoraConfig(r=4, lora_alpha=6, rank_pattern=..., alpha_pattern=...).to_dict() has them;
    # the text encoder with rsLoRA's alpha / sqrt(r)
    unet_config = dict(r=4, lora_alpha=6, target_modules=list(UNET_TARGETS),
                       rank_pattern={"proj_in": 2, "conv1": 2}, use_rslora=False,
                       alpha_pattern={"proj_in": 1.0, r"down_blocks\.0\.resnets\.0\.conv1": 8})
    text_config_ = dict(r=2, lora_alpha=3, target_modules=list(TEXT_TARGETS), rank_pattern={},
                        alpha_pattern={}, use_rslora=True)
    StableDiffusionPipeline.save_lora_weights(folder / "lora", unet_lora_layers=unet_sd,
                                              text_encoder_lora_layers=text_sd,
                                              unet_lora_adapter_metadata=unet_config,
                                              text_encoder_lora_adapter_metadata=text_config_)
    return name, path, folder / "lora" / "pytorch_lora_weights.safetensors"


def reference_models(path, *loras):
    """diffusers' U-Net and text encoder from the hub folder, with LoRA files (path, scale) merged in."""
    ref = StableDiffusionPipeline.from_pretrained(path)
    for lora, scale in loras:
        diffusers_merge(lora, ref.unet, ref.text_encoder, scale)
    return ref


def assert_same_outputs(ref, pipe: minisd.Pipeline, tolerance: float = 1e-4) -> torch.Tensor:
    """The text encoder's hidden states and the U-Net's eps agree; returns minisd's eps."""
    ids = pipe.tokenizer(PROMPTS)
    with torch.no_grad():
        context = ref.text_encoder(ids).last_hidden_state
        assert rel_diff(context, pipe.text_encoder(ids)) <= tolerance
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        eps = pipe.unet(x, 500, context)
        assert rel_diff(ref.unet(x, 500, context).sample, eps) <= tolerance
    return eps


def test_diffusers_file_loads_in_minisd(family):
    name, path, lora = family
    assert open_lora(lora).layout == "diffusers"
    assert open_lora(lora.parent).name == str(lora)  # the folder save_lora_weights wrote
    pipe = minisd.load_pipeline(path)
    plain = assert_same_outputs(reference_models(path), pipe)
    pipe.load_lora(lora)
    with_lora = assert_same_outputs(reference_models(path, (lora, 1.0)), pipe)
    assert rel_diff(with_lora, plain) > 1e-2  # the LoRA does change the output
    loaded = read_lora(lora, dict(unet=pipe.unet, text_encoder=pipe.text_encoder))
    unet = loaded["unet"]
    cross = "up.1.blocks.2.attn.transformer_blocks.0.attn2.to_v"
    assert {"down.0.blocks.0.res.conv1", "mid.attn.proj_in", cross} <= unet.keys()
    assert "layers.1.fc1" in loaded["text_encoder"]
    assert unet["down.0.blocks.0.res.conv1"].alpha == 8 and unet["mid.attn.proj_in"].alpha == 1
    assert loaded["text_encoder"]["layers.0.attn.to_q"].alpha == pytest.approx(3 * 2 ** 0.5)  # rsLoRA


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "minisd"])
def test_minisd_writes_what_diffusers_reads(family, layout, tmp_path):
    """The same LoRA written by minisd in each layout: minisd and diffusers' reader (for kohya: its
    lora_conversion_utils, as load_lora_weights runs them) load it to the outputs of the original file."""
    name, path, lora = family
    pipe = minisd.load_pipeline(path)
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)
    out = tmp_path / f"{layout}.safetensors"
    write_lora(out, read_lora(lora, models), models, layout)
    assert open_lora(out).layout == layout
    expected = assert_same_outputs(reference_models(path, (lora, 1.0)),
                                   minisd.load_pipeline(path).load_lora(lora))
    if layout != "minisd":
        assert_same_outputs(reference_models(path, (out, 1.0)), pipe.load_lora(out))
    else:
        pipe.load_lora(out)
    with torch.no_grad():
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        context = pipe.text_encoder(pipe.tokenizer(PROMPTS))
        assert rel_diff(pipe.unet(x, 500, context), expected) <= 1e-5
    if layout == "kohya":
        keys = set(load_file(out))
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.alpha" in keys


@pytest.mark.slow
def test_sampled_image_with_two_loras(family, tmp_path):
    """A whole image, two LoRAs at their own scales: minisd's pipeline and diffusers' with the same LoRAs
    merged make the same image; unload_loras gives the weights back exactly."""
    name, path, lora = family
    pipe = minisd.load_pipeline(path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)
    other = {c: {n: LowRank(u.down.roll(1, 0), u.up.flip(0), u.alpha) for n, u in layers.items()}
             for c, layers in read_lora(lora, models).items()}
    write_lora(tmp_path / "other.safetensors", other, models, "kohya")
    pipe.load_lora(lora, 0.7).load_lora(tmp_path / "other.safetensors", -0.4)
    assert pipe.loras == [(str(lora), 0.7), (str(tmp_path / "other.safetensors"), -0.4)]
    ref = reference_models(path, (lora, 0.7), (tmp_path / "other.safetensors", -0.4))
    ref.set_progress_bar_config(disable=True)
    ours = pipe(PROMPTS[0], steps=4, seed=3, height=64, width=64, progress=False, output="np")
    theirs = ref(PROMPTS[0], num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(3),
                 height=64, width=64, output_type="np").images
    assert np.abs(ours - theirs).max() <= TOLERANCE
    plain = minisd.load_pipeline(path)(PROMPTS[0], steps=4, seed=3, height=64, width=64, progress=False,
                                       output="np")
    assert np.abs(ours - plain).mean() > 0.01
    pipe.unload_loras()
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before) and pipe.loras == []


def test_older_diffusers_layouts(family, tmp_path):
    """Files of diffusers before peft: `.lora.down.weight` (U-Net), `.lora_linear_layer.down.weight` (text
    encoder) and the attention processors' `processor.to_q_lora.down.weight`. No metadata: alpha = rank."""
    name, path, lora = family
    peft = load_file(lora)
    old = {}
    for key, tensor in peft.items():
        factor = "down" if ".lora_A." in key else "up"
        module = key.rsplit(".lora_", 1)[0]
        if key.startswith("text_encoder."):
            old[f"{module}.lora_linear_layer.{factor}.weight"] = tensor
        elif re.search(r"attn\d\.to_[qv]$", module):
            attn, proj = module.rsplit(".", 1)
            old[f"{attn}.processor.{proj}_lora.{factor}.weight"] = tensor
        else:
            old[f"{module}.lora.{factor}.weight"] = tensor
    save_file(old, tmp_path / "old.safetensors")
    assert open_lora(tmp_path / "old.safetensors").layout == "diffusers"
    assert_same_outputs(reference_models(path, (tmp_path / "old.safetensors", 1.0)),
                        minisd.load_pipeline(path).load_lora(tmp_path / "old.safetensors"))


def test_kohya_conv_shaped_proj_in(family, tmp_path):
    """sd-scripts may give SD-v2's proj_in 1x1-conv factors; minisd's Linear proj_in takes them."""
    name, path, lora = family
    pipe = minisd.load_pipeline(path)
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)
    write_lora(tmp_path / "k.safetensors", read_lora(lora, models), models, "kohya")
    tensors = load_file(tmp_path / "k.safetensors")
    for key in [k for k in tensors if "proj_in.lora" in k]:
        tensors[key] = tensors[key].reshape(*tensors[key].shape[:2], 1, 1)
    save_file(tensors, tmp_path / "conv.safetensors")
    expected = assert_same_outputs(reference_models(path, (lora, 1.0)),
                                   minisd.load_pipeline(path).load_lora(lora))
    pipe.load_lora(tmp_path / "conv.safetensors")
    with torch.no_grad():
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        assert rel_diff(pipe.unet(x, 500, pipe.text_encoder(pipe.tokenizer(PROMPTS))), expected) <= 1e-5


def test_with_peft_itself(family, tmp_path):
    """Where peft is installed: a LoRA that peft puts into diffusers' U-Net and transformers' text encoder,
    saved as diffusers' training scripts save it, loads in minisd to their outputs; and minisd's diffusers and
    kohya files of it load in diffusers' own load_lora_weights to the same outputs."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    name, path, _ = family
    ref = StableDiffusionPipeline.from_pretrained(path)
    torch.manual_seed(0)  # init_lora_weights=False: lora_B random too, so that the LoRA changes the outputs
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v"],
                                    init_lora_weights=False))
    ref.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "out_proj"]))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=ref.text_encoder.peft_config["default"].to_dict())
    pipe = minisd.load_pipeline(path).load_lora(tmp_path / "peft")
    assert_same_outputs(ref, pipe)
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)
    lora = read_lora(tmp_path / "peft", models)
    for layout in ("diffusers", "kohya"):
        write_lora(tmp_path / f"{layout}.safetensors", lora, models, layout)
        other = StableDiffusionPipeline.from_pretrained(path)
        other.load_lora_weights(str(tmp_path / f"{layout}.safetensors"))
        assert_same_outputs(other, pipe)


# the ResBlock, resampler and transformer-projection convs, beside attention: diffusers' LCM-LoRA targets
CONV_TARGETS = ["to_q", "conv1", "conv2", "conv_shortcut", "downsample.conv", "upsample.conv", "proj_in"]


def test_conv_lora_trained_by_minisd_loads_in_diffusers(family, tmp_path):
    """LoRA layers that minisd injects into convs and Linears (as dreambooth.py and train_lcm.py train them),
    written in diffusers' and kohya's layouts, give the same U-Net output in diffusers' load_lora_weights as
    minisd's unmerged layers, and as they give merged."""
    name, path, _ = family
    pipe = minisd.load_pipeline(path)
    names = inject_lora(pipe.unet.requires_grad_(False), CONV_TARGETS, rank=2, alpha=3.0)
    assert any(n.endswith("res.conv1") for n in names) and any(n.endswith("downsample.conv") for n in names)
    assert any(isinstance(m, LoRAConv2d) for m in pipe.unet.modules())
    randomize_lora_(pipe.unet)
    models = dict(unet=pipe.unet)
    plain = assert_same_outputs(reference_models(path), minisd.load_pipeline(path))
    for layout in ("diffusers", "kohya"):
        out = tmp_path / f"{layout}.safetensors"
        write_lora(out, {"unet": lora_layers(pipe.unet)}, models, layout)
        ref = StableDiffusionPipeline.from_pretrained(path)
        ref.load_lora_weights(str(out))
        trained = assert_same_outputs(ref, pipe)
        assert rel_diff(trained, plain) > 1e-2
    merge_lora(pipe.unet)
    assert rel_diff(assert_same_outputs(ref, pipe), trained) <= 1e-5


# ---- what does not fit -------------------------------------------------------------------------------------

def test_lora_of_another_model_is_refused(family, tmp_path):
    name, path, lora = family
    pipe = minisd.load_pipeline(path)
    tiny = UNet(TABLE)  # another U-Net: every key names a layer it lacks, or one of another shape
    with pytest.raises(CheckpointError) as error:
        read_lora(lora, dict(unet=tiny, text_encoder=pipe.text_encoder))
    message = str(error.value)
    assert "\n" not in message and "does not fit this model" in message and "(diffusers layout)" in message
    assert re.search(r"\d+ of its \d+ keys name no layer", message) and "in all)" in message
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    tensors = load_file(lora)
    key = next(k for k in tensors if k.startswith("unet.") and "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"1 layers have another shape \(.*up .* @ down \(\d+, 3\)"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # refused whole
    del tensors[key.replace("lora_A", "lora_B")]
    save_file(tensors, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="miss their other factor"):
        pipe.load_lora(tmp_path / "half.safetensors")


def test_unknown_layouts_are_refused(tmp_path):
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(CheckpointError, match="1 of its 1 keys .*lora_unet_x.hada_w1_a.*LoHa"):
        read_lora(tmp_path / "loha.safetensors", dict(unet=UNet(TABLE)))
    save_file({"model.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"not a LoRA file .*\(model.weight\)"):
        open_lora(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        open_lora(tmp_path)


# ---- minisd's own files and sample.py ---------------------------------------------------------------------

TOY = str(Path(__file__).resolve().parents[1] / "weights" / "toy-sd")


def test_minisd_file_round_trip_and_sample_py(tmp_path, capsys):
    """A LoRA trained in minisd (here: injected and randomised) saved in minisd's layout, loaded for sampling
    by sample.py --lora/--lora-scale: the same image as the merged LoRALinear layers."""
    pipe = minisd.load_pipeline(TOY)
    inject_lora(pipe.unet, ["to_q", "to_v"], rank=4, alpha=6)
    inject_lora(pipe.text_encoder, ["to_q", "to_v"], rank=2)
    randomize_lora_(pipe.unet), randomize_lora_(pipe.text_encoder, seed=1)
    lora = {"unet": lora_layers(pipe.unet), "text_encoder": lora_layers(pipe.text_encoder)}
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder)
    write_lora(tmp_path / "mine.safetensors", lora, models, "minisd")
    tensors = load_file(tmp_path / "mine.safetensors")
    assert set(tensors) == {f"{c}.{k}" for c, m in models.items() for k in lora_state_dict(m)} | {
        f"{c}.{n}.alpha" for c, layers in lora.items() for n in layers}
    again = read_lora(tmp_path / "mine.safetensors", models)
    assert all(torch.equal(again[c][n].up, u.up) and again[c][n].alpha == u.alpha
               for c, layers in lora.items() for n, u in layers.items())
    kwargs = dict(steps=2, seed=1, height=32, width=32, guidance=4.0, progress=False)
    merge_lora(pipe.unet), merge_lora(pipe.text_encoder)
    expected = pipe("a red circle", **kwargs)[0]

    out, mine = tmp_path / "s.png", str(tmp_path / "mine.safetensors")
    argv = ["a red circle", "--model", TOY, "--steps", "2", "--seed", "1", "--height", "32", "--width", "32",
            "--guidance", "4", "--no-progress", "--out", str(out), "--lora", mine]
    assert sample_main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert Image.open(out).text["lora"] == f"{mine} (1)"
    assert sample_main([*argv, "--lora-scale", "0"]) == 0  # strength 0: the model without the LoRA
    plain = minisd.load_pipeline(TOY)("a red circle", **kwargs)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(plain))
    assert not np.array_equal(np.asarray(plain), np.asarray(expected))
    capsys.readouterr()
    with pytest.raises(ValueError, match="before fuse_qkv"):
        minisd.load_pipeline(TOY).fuse_qkv().load_lora(mine)
