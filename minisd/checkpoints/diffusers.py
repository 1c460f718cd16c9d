"""The diffusers hub layout: one folder per component (unet/, vae/, text_encoder/, tokenizer/,
scheduler/), each with a config.json and its weights under diffusers/transformers key names.

Each component has a rule table (native name template <-> diffusers name template, see remap.py),
a loader that reads the folder into a minisd model, and a saver that writes a folder that
diffusers and transformers load.
"""

import dataclasses
from pathlib import Path

import torch

from minisd.checkpoints.files import find_weights, read_json, read_state_dict, write_json, write_state_dict
from minisd.checkpoints.remap import Rule, export, load_into
from minisd.checkpoints.taesd import load_vae_tiny, save_vae_tiny
from minisd.clip import CLIPTextConfig, CLIPTextEncoder
from minisd.table import Stage, UNetTable, identify
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.vae_tiny import AutoencoderTiny

# ---- U-Net ------------------------------------------------------------------------------

# Config values that minisd's U-Net assumes. SD-v1/v2 and every BK-SDM student use exactly these;
# a config with anything else (class embeddings, an addition embedding...) is another model. LCM's
# `time_cond_proj_dim` is read into the table (guidance_embed_dim).
UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "encoder_hid_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "resnet_out_scale_factor": 1.0, "timestep_post_act": None,
}


def _per_stage(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"U-Net config: {what} has {len(values)} entries for {n} stages")
    return values


def unet_table_from_config(cfg: dict, name: str = "unet") -> UNetTable:
    """Read a diffusers UNet2DConditionModel config.json into a stage/block table."""
    bad = [f"{k}={cfg[k]!r}" for k, v in UNET_FIXED.items() if k in cfg and cfg[k] != v]
    if bad:
        raise ValueError(f"U-Net config not supported by minisd (SD-v1/v2 U-Nets only): {', '.join(bad)}")
    channels = cfg.get("block_out_channels", (320, 640, 1280, 1280))
    n = len(channels)
    down_types = cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    up_types = cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    attention = ["CrossAttn" in t for t in down_types]
    if len(down_types) != n or attention[::-1] != ["CrossAttn" in t for t in up_types]:
        raise ValueError(f"U-Net config: down_block_types {down_types} and up_block_types {up_types} "
                         f"do not mirror each other over {n} stages")
    layers = _per_stage(cfg.get("layers_per_block", 2), n, "layers_per_block")
    # SD's configs put the head count in `attention_head_dim` (a long-standing diffusers misnomer);
    # newer configs may set `num_attention_heads` instead, which then wins.
    heads = _per_stage(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n,
                       "attention_head_dim")
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"U-Net config: mid_block_type {mid_type!r} not supported "
                         "(UNetMidBlock2DCrossAttn or null)")
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ValueError(f"U-Net config: transformer_layers_per_block must be one number, not {depth!r}")
    stages = tuple(Stage(c, a, h, down=tuple(range(k)), up=tuple(range(k + 1)))
                   for c, a, h, k in zip(channels, attention, heads, layers))
    sample = cfg.get("sample_size", 64)
    return UNetTable(name, stages, mid=mid_type is not None, context_dim=cfg.get("cross_attention_dim", 1280),
                     linear_proj=cfg.get("use_linear_projection", False),
                     upcast_attention=cfg.get("upcast_attention", False),
                     teacher_down=max(layers), teacher_up=max(layers) + 1,
                     in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                     depth=depth, groups=cfg.get("norm_num_groups", 32),
                     sample_size=sample if isinstance(sample, int) else sample[0],
                     guidance_embed_dim=cfg.get("time_cond_proj_dim"))


def unet_config_from_table(table: UNetTable) -> dict:
    """A diffusers UNet2DConditionModel config.json for a table (students included)."""
    for s, st in enumerate(table.stages):
        if len(st.up) != len(st.down) + 1:
            raise ValueError(f"table {table.name}, stage {s}: diffusers needs one more up block than down "
                             f"blocks (has {len(st.down)} down, {len(st.up)} up)")
    layers = [len(st.down) for st in table.stages]
    heads = [st.heads for st in table.stages]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.27.0",
        **UNET_FIXED, "norm_num_groups": table.groups,
        "sample_size": table.sample_size, "in_channels": table.in_channels,
        "out_channels": table.out_channels, "block_out_channels": [st.channels for st in table.stages],
        "down_block_types": ["CrossAttnDownBlock2D" if st.attention else "DownBlock2D"
                             for st in table.stages],
        "up_block_types": ["CrossAttnUpBlock2D" if st.attention else "UpBlock2D"
                           for st in reversed(table.stages)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if table.mid else None,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "cross_attention_dim": table.context_dim, "use_linear_projection": table.linear_proj,
        "upcast_attention": table.upcast_attention, "transformer_layers_per_block": table.depth,
        "time_cond_proj_dim": table.guidance_embed_dim,
    }


def unet_rules(table: UNetTable) -> list[Rule]:
    n = len(table.stages)
    up = []
    for s in range(n):  # diffusers numbers up blocks in execution order: innermost stage first
        up += [(f"up.{s}.blocks.{{b}}.res.", f"up_blocks.{n - 1 - s}.resnets.{{b}}."),
               (f"up.{s}.blocks.{{b}}.attn.", f"up_blocks.{n - 1 - s}.attentions.{{b}}."),
               (f"up.{s}.upsample.", f"up_blocks.{n - 1 - s}.upsamplers.0.")]
    return [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("guidance_proj.", "time_embedding.cond_proj."),  # LCM U-Nets' guidance embedding
        ("norm_out.", "conv_norm_out."),
        ("down.{s}.blocks.{b}.res.", "down_blocks.{s}.resnets.{b}."),
        ("down.{s}.blocks.{b}.attn.", "down_blocks.{s}.attentions.{b}."),
        ("down.{s}.downsample.", "down_blocks.{s}.downsamplers.0."),
        ("mid.res1.", "mid_block.resnets.0."),
        ("mid.attn.", "mid_block.attentions.0."),
        ("mid.res2.", "mid_block.resnets.1."),
        *up,
        ("to_out.", "to_out.0."),          # diffusers wraps the output Linear with a Dropout
        ("ff.proj.", "ff.net.0.proj."),    # GEGLU's projection
        ("ff.out.", "ff.net.2."),
    ]


def load_unet(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              half: bool = False) -> UNet:
    folder = Path(folder)
    table = unet_table_from_config(read_json(folder / "config.json"))
    table = dataclasses.replace(table, name=identify(table))
    path = find_weights(folder, ("diffusion_pytorch_model",), half)
    with torch.device("meta"):
        unet = UNet(table)
    return load_into(unet, read_state_dict(path), unet_rules(table), what=f"U-Net weights {path}",
                     dtype=dtype, device=device)


def save_unet(unet: UNet, folder: str | Path) -> None:
    folder = Path(folder)
    write_json(folder / "config.json", unet_config_from_table(unet.config))
    write_state_dict(folder / "diffusion_pytorch_model.safetensors", export(unet, unet_rules(unet.config)))


# ---- VAE --------------------------------------------------------------------------------


# Native names: see minisd/vae.py. Both number the decoder's levels in execution order.
VAE_RULES: list[Rule] = [
    ("down.{i}.res.", "down_blocks.{i}.resnets."),
    ("down.{i}.downsample.", "down_blocks.{i}.downsamplers.0."),
    ("up.{i}.res.", "up_blocks.{i}.resnets."),
    ("up.{i}.upsample.", "up_blocks.{i}.upsamplers.0."),
    ("mid.res1.", "mid_block.resnets.0."),
    ("mid.res2.", "mid_block.resnets.1."),
    ("mid.attn.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn.to_out.", "mid_block.attentions.0.to_out.0."),  # diffusers wraps it with a Dropout
    ("mid.attn.", "mid_block.attentions.0."),
    ("norm_out.", "conv_norm_out."),
]

# Older diffusers saved the VAE's attention as query/key/value/proj_attn, and the SD-v1/v2 hub repos
# still hold those names; diffusers renames them on load (ModelMixin._fix_state_dict_keys_on_load).
# The more specific rules come first, so they win over VAE_RULES' "mid.attn." (remap.py: first match).
VAE_LEGACY_RULES: list[Rule] = [
    ("mid.attn.to_q.", "mid_block.attentions.0.query."),
    ("mid.attn.to_k.", "mid_block.attentions.0.key."),
    ("mid.attn.to_v.", "mid_block.attentions.0.value."),
    ("mid.attn.to_out.", "mid_block.attentions.0.proj_attn."),
    *VAE_RULES,
]


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             half: bool = False) -> AutoencoderKL:
    """Read a diffusers AutoencoderKL folder: config.json, diffusion_pytorch_model[.fp16].safetensors/.bin."""
    folder = Path(folder)
    config = VAEConfig.from_diffusers(read_json(folder / "config.json"))
    path = find_weights(folder, ("diffusion_pytorch_model",), half)
    state_dict = read_state_dict(path)
    legacy = "encoder.mid_block.attentions.0.query.weight" in state_dict
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    return load_into(vae, state_dict, VAE_LEGACY_RULES if legacy else VAE_RULES, what=f"VAE weights {path}",
                     dtype=dtype, device=device)


def load_any_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 half: bool = False) -> AutoencoderKL | AutoencoderTiny:
    """A diffusers VAE folder of either class its config.json names: AutoencoderKL (SD's) or AutoencoderTiny
    (TAESD, minisd/vae_tiny.py)."""
    if read_json(Path(folder) / "config.json").get("_class_name") == "AutoencoderTiny":
        return load_vae_tiny(folder, dtype, device, half)
    return load_vae(folder, dtype, device, half)


def save_vae(vae: AutoencoderKL, folder: str | Path) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors (current diffusers names)."""
    folder = Path(folder)
    write_json(folder / "config.json", vae.config.to_diffusers())
    write_state_dict(folder / "diffusion_pytorch_model.safetensors", export(vae, VAE_RULES))


# ---- CLIP text encoder and tokenizer -----------------------------------------------------


# transformers' CLIPTextModel names (text_encoder/model.safetensors). Native names: minisd/clip.py.
TEXT_RULES: list[Rule] = [
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("position_embedding.", "text_model.embeddings.position_embedding."),
    ("layers.{i}.", "text_model.encoder.layers.{i}."),
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.to_q.", "self_attn.q_proj."),
    ("attn.to_k.", "self_attn.k_proj."),
    ("attn.to_v.", "self_attn.v_proj."),
    ("attn.to_out.", "self_attn.out_proj."),
    ("fc1.", "mlp.fc1."),
    ("fc2.", "mlp.fc2."),
    ("final_norm.", "text_model.final_layer_norm."),
]
# transformers < 4.31 saved the position-id buffer (torch.arange(77)); minisd computes it.
TEXT_IGNORE = (r"text_model\.embeddings\.position_ids$",)


def with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put CLIPTextModel keys under `text_model.`, where the hub repos and most single files have them.

    transformers >= 5 flattened CLIPTextModel and saves its keys without the prefix; so do some
    SD-v1 single files. Both forms load; minisd writes the prefixed one, which all versions read.
    """
    if any(k.startswith("text_model.") for k in state_dict):
        return state_dict
    return {"text_model." + k: v for k, v in state_dict.items()}


def load_text_encoder(folder: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", half: bool = False) -> CLIPTextEncoder:
    """Read a transformers CLIPTextModel folder (config.json + model[.fp16].safetensors/.bin)."""
    folder = Path(folder)
    config = CLIPTextConfig.from_transformers(read_json(folder / "config.json"))
    path = find_weights(folder, ("model", "pytorch_model"), half)
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
    return load_into(encoder, with_text_model_prefix(read_state_dict(path)), TEXT_RULES, ignore=TEXT_IGNORE,
                     what=f"text encoder weights {path}", dtype=dtype, device=device)


def save_text_encoder(encoder: CLIPTextEncoder, folder: str | Path) -> None:
    """Write config.json and model.safetensors, which transformers' CLIPTextModel loads."""
    folder = Path(folder)
    write_json(folder / "config.json", encoder.config.to_transformers())
    write_state_dict(folder / "model.safetensors", export(encoder, TEXT_RULES))


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Read a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    folder = Path(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "tokenizer.json"):
        if (folder / name).is_file():
            # a truncated file is named here; the tokenizer library would not name it
            read_json(folder / name)
    try:
        return CLIPTokenizer.from_folder(folder)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ValueError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: {e})") from None


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    tokenizer.save(folder)


# ---- The whole pipeline folder -----------------------------------------------------------

COMPONENT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def model_index(scheduler_class: str, vae_class: str = "AutoencoderKL") -> dict:
    """model_index.json as StableDiffusionPipeline.save_pretrained writes it, without a safety checker."""
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.27.0",
            "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", vae_class], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}


def load_folder(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                half: bool = False) -> dict:
    """Every component of a diffusers-layout pipeline folder, as a dict of minisd objects.

    half: read the half-precision copies of the weights (NAME.fp16.safetensors, diffusers'
    variant="fp16") where the folder has them; the models are cast to `dtype` either way.
    """
    folder = Path(folder)
    # a train.py checkpoint links vae/, text_encoder/, tokenizer/, scheduler/ to its run folder's (../vae...);
    # copied away from it, the links point nowhere
    dangling = [f"{c}/" for c in COMPONENT_DIRS if (folder / c).is_symlink() and not (folder / c).exists()]
    if dangling:
        raise FileNotFoundError(
            f"{folder}: {', '.join(dangling)} are links into the training run folder that do not resolve "
            "here (a train.py checkpoint shares them with its run folder). Copy the whole run folder, or "
            f"make a standalone copy where the run folder is: python -m minisd.convert RUN/{folder.name} OUT "
            "(or cp -rL)")
    missing = [f"{c}/" for c in COMPONENT_DIRS if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a diffusers-layout pipeline folder: it has no "
                                f"{', '.join(missing)} (expected model_index.json, unet/, vae/, "
                                "text_encoder/, tokenizer/, scheduler/)")
    return dict(tokenizer=load_tokenizer(folder / "tokenizer"),
                text_encoder=load_text_encoder(folder / "text_encoder", dtype, device, half),
                unet=load_unet(folder / "unet", dtype, device, half),
                vae=load_any_vae(folder / "vae", dtype, device, half),
                scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"))


def save_folder(components: dict, folder: str | Path) -> None:
    """Write a pipeline folder that both minisd and diffusers' StableDiffusionPipeline load."""
    folder = Path(folder)
    save_unet(components["unet"], folder / "unet")
    vae = components["vae"]
    (save_vae_tiny if isinstance(vae, AutoencoderTiny) else save_vae)(vae, folder / "vae")
    save_text_encoder(components["text_encoder"], folder / "text_encoder")
    save_tokenizer(components["tokenizer"], folder / "tokenizer")
    scheduler = components["scheduler_config"]
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_json(folder / "model_index.json", model_index(scheduler.get("_class_name", "PNDMScheduler"),
                                                        vae.config.to_diffusers()["_class_name"]))
