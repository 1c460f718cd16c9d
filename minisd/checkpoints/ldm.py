"""The original single-file layout (CompVis latent diffusion, as SD-v1 and SD-v2 shipped).

One .ckpt/.safetensors file holds everything under prefixes: `model.diffusion_model.` (U-Net),
`first_stage_model.` (VAE) and `cond_stage_model.` (text encoder: `transformer.` for SD-v1's
HF CLIP, `model.` for SD-v2's OpenCLIP). Each component has a rule table here.
"""

import dataclasses
import re
from pathlib import Path

import torch

from minisd.checkpoints.diffusers import TEXT_IGNORE, TEXT_RULES, with_text_model_prefix
from minisd.checkpoints.files import read_checkpoint, write_checkpoint, write_state_dict
from minisd.checkpoints.remap import CheckpointError, Rule, conv1x1_as_linear, export, load_into, rename
from minisd.clip import TEXT_ENCODERS, CLIPTextConfig, CLIPTextEncoder, family_of
from minisd.table import TEACHERS, VARIANTS, UNetTable, variant
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import SD_VAE, AutoencoderKL, VAEConfig

# ---- U-Net ------------------------------------------------------------------------------
# LDM numbers the U-Net's blocks in one flat list per path: `input_blocks.{k}` (conv_in, then
# each down block and downsampler in order), `middle_block.{0,1,2}`, and `output_blocks.{m}` (up
# blocks in execution order, the upsampler inside the last block of its stage). Inside a block,
# `.0` is the ResBlock and `.1` the SpatialTransformer. The flat numbers come from the table.

UNET_PREFIX = "model.diffusion_model."
GUIDANCE_KEY = "time_embedding.cond_proj.weight"  # an LCM U-Net's guidance embedding [320, embed dim]

RES_RULES = (  # openaimodel.ResBlock's Sequentials -> named layers
    ("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."),
)
ATTN_RULES = (("to_out.", "to_out.0."), ("ff.proj.", "ff.net.0.proj."), ("ff.out.", "ff.net.2."))


def unet_rules(table: UNetTable) -> list[Rule]:
    n, k, m = len(table.stages), 1, 0
    # LDM has no guidance embedding; LCM single files keep diffusers' name for it under the prefix, as
    # diffusers' convert_diffusers_to_original_stable_diffusion.py leaves a key it has no rule for
    rules = [("conv_in.", "input_blocks.0.0."), ("time_embed.", "time_embed."),
             ("guidance_proj.", "time_embedding.cond_proj."), ("norm_out.", "out.0."),
             ("conv_out.", "out.2.")]
    for s, stage in enumerate(table.stages):
        for b in range(len(stage.down)):
            rules.append((f"down.{s}.blocks.{b}.res.", f"input_blocks.{k}.0.", RES_RULES))
            if stage.attention:
                rules.append((f"down.{s}.blocks.{b}.attn.", f"input_blocks.{k}.1.", ATTN_RULES))
            k += 1
        if s < n - 1:
            rules.append((f"down.{s}.downsample.conv.", f"input_blocks.{k}.0.op."))
            k += 1
    rules += [("mid.res1.", "middle_block.0.", RES_RULES), ("mid.attn.", "middle_block.1.", ATTN_RULES),
              ("mid.res2.", "middle_block.2.", RES_RULES)]
    for s in reversed(range(n)):
        stage = table.stages[s]
        for b in range(len(stage.up)):
            rules.append((f"up.{s}.blocks.{b}.res.", f"output_blocks.{m}.0.", RES_RULES))
            if stage.attention:
                rules.append((f"up.{s}.blocks.{b}.attn.", f"output_blocks.{m}.1.", ATTN_RULES))
            m += 1
        if s > 0:  # the upsampler follows the last block's ResBlock (and SpatialTransformer)
            rules.append((f"up.{s}.upsample.", f"output_blocks.{m - 1}.{2 if stage.attention else 1}."))
    return rules


def unet_keys(table: UNetTable) -> set[str]:
    """The single-file keys (without prefix) that a U-Net of this table has."""
    with torch.device("meta"):
        unet = UNet(table)
    return {rename(k, unet_rules(table)) for k in unet.state_dict()}


def detect_unet(unet_sd: dict[str, torch.Tensor], family: str | None = None,
                name: str | None = None) -> UNetTable:
    """Which SD family and BK-SDM variant a single file's U-Net weights (keys without prefix) are.

    The family follows from the cross-attention width (`family_of`: 768 for SD-v1's CLIP, 1024 for
    SD-v2's OpenCLIP); the variant is the table whose key set the file has exactly. `family`/`name`
    skip the guess. An LCM U-Net's guidance embedding (GUIDANCE_KEY) sets the table's guidance_embed_dim.
    """
    if family is None:
        widths = {v.shape[1] for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight")}
        width = widths.pop() if len(widths) == 1 else 0
        family = family_of(width)
        if width != TEXT_ENCODERS[family].width:  # none, several, or a width that no SD family has
            raise ValueError("cannot tell the SD family from the single file's cross-attention width "
                             "(expected 768 for SD-v1 or 1024 for SD-v2); pass the family explicitly")
    keys = set(unet_sd)
    guidance = unet_sd[GUIDANCE_KEY].shape[1] if GUIDANCE_KEY in unet_sd else None
    names = [name] if name else list(VARIANTS)
    for nm in names:
        table = dataclasses.replace(variant(TEACHERS[family], nm), guidance_embed_dim=guidance)
        if unet_keys(table) == keys:
            return dataclasses.replace(table, name=table.name + ("-lcm" if guidance else ""))
    raise ValueError(f"the single file's U-Net is not an SD-{family} U-Net nor a BK-SDM student of it "
                     f"(tried variants {', '.join(names)})")


def unet_from_ldm(sd: dict[str, torch.Tensor], table: UNetTable, dtype=torch.float32, device="cpu") -> UNet:
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        unet = UNet(table)
    return load_into(unet, unet_sd, unet_rules(table), what="single-file U-Net", dtype=dtype, device=device)


def unet_to_ldm(unet: UNet) -> dict[str, torch.Tensor]:
    return export(unet, unet_rules(unet.config), prefix=UNET_PREFIX)


# ---- VAE --------------------------------------------------------------------------------


VAE_PREFIX = "first_stage_model."


def vae_rules(levels: int = 4) -> list[Rule]:
    """Native VAE names (minisd/vae.py) <-> LDM names, without the `first_stage_model.` prefix.

    LDM numbers the decoder's levels by resolution, as the encoder's (ldm Decoder: `self.up.insert(0, up)`),
    so decoder.up.3 runs first; minisd numbers them in execution order. The first rules swap the index.
    """
    return [
        *[(f"decoder.up.{i}.", f"decoder.up.{levels - 1 - i}.") for i in range(levels)],
        ("res.", "block."),  # down.{i}.res.{j} and up.{i}.res.{j}
        ("conv_shortcut.", "nin_shortcut."),
        ("mid.res1.", "mid.block_1."),
        ("mid.res2.", "mid.block_2."),
        ("mid.attn.to_q.", "mid.attn_1.q."),  # q, k, v, proj_out are 1x1 convs in LDM
        ("mid.attn.to_k.", "mid.attn_1.k."),
        ("mid.attn.to_v.", "mid.attn_1.v."),
        ("mid.attn.to_out.", "mid.attn_1.proj_out."),
        ("mid.attn.", "mid.attn_1."),  # its GroupNorm, `norm` in both
    ]


VAE_RULES = vae_rules(len(SD_VAE.block_channels))


def _vae_as_conv1x1(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of conv1x1_as_linear: the VAE's only 2-D weights are its attention's Linears."""
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor  # [out, in] -> [out, in, 1, 1]


def vae_from_ldm(state_dict: dict[str, torch.Tensor], config: VAEConfig = SD_VAE,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The VAE of a whole single-file state dict (its `first_stage_model.*` keys; strict on those)."""
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    if not vae_sd:
        raise CheckpointError(f"no VAE in this single file: no key starts with {VAE_PREFIX!r}")
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    return load_into(vae, vae_sd, vae_rules(len(config.block_channels)), shape_fix=conv1x1_as_linear,
                     what=f"single-file VAE (keys under {VAE_PREFIX})", dtype=dtype, device=device)


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights as a single file holds them: prefixed LDM names, attention as 1x1 convs."""
    return export(vae, vae_rules(len(vae.config.block_channels)), shape_fix=_vae_as_conv1x1,
                  prefix=VAE_PREFIX)


# ---- CLIP text encoder --------------------------------------------------------------------


TEXT_PREFIX = {"v1": "cond_stage_model.transformer.", "v2": "cond_stage_model.model."}

# SD-v1 holds transformers' CLIPTextModel as is, so it uses diffusers.py's TEXT_RULES.
# SD-v2 holds OpenCLIP's TextTransformer (open_clip/transformer.py), with q/k/v as split by
# split_in_proj. `token_embedding.weight` has the same name in both and needs no rule.
OPENCLIP_RULES: list[Rule] = [
    ("position_embedding.weight", "positional_embedding"),  # a bare Parameter in OpenCLIP
    ("layers.{i}.", "transformer.resblocks.{i}."),
    ("norm1.", "ln_1."),
    ("norm2.", "ln_2."),
    ("attn.to_q.", "attn.q_proj."),
    ("attn.to_k.", "attn.k_proj."),
    ("attn.to_v.", "attn.v_proj."),
    ("attn.to_out.", "attn.out_proj."),
    ("fc1.", "mlp.c_fc."),
    ("fc2.", "mlp.c_proj."),
    ("final_norm.", "ln_final."),
]


def split_in_proj(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's attention is torch's nn.MultiheadAttention, which keeps the q, k and v projections
    fused: `attn.in_proj_weight` [3C, C] (rows q, then k, then v) and `attn.in_proj_bias` [3C].
    Split them into `attn.{q,k,v}_proj.{weight,bias}`; other keys pass through."""
    out = {}
    for key, tensor in state_dict.items():
        stem, _, kind = key.rpartition(".in_proj_")  # kind: "weight" or "bias"
        if not stem:
            out[key] = tensor
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
            out[f"{stem}.{name}.{kind}"] = part.clone()  # own storage: the model can be saved as safetensors
    return out


def fuse_in_proj(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_in_proj: `attn.{q,k,v}_proj.*` -> `attn.in_proj_*`."""
    out = {}
    for key, tensor in state_dict.items():
        stem, _, kind = key.rpartition(".q_proj.")
        if stem:
            out[f"{stem}.in_proj_{kind}"] = torch.cat([tensor, state_dict[f"{stem}.k_proj.{kind}"],
                                                       state_dict[f"{stem}.v_proj.{kind}"]])
        elif ".k_proj." not in key and ".v_proj." not in key:
            out[key] = tensor
    return out


def text_encoder_from_ldm(state_dict: dict[str, torch.Tensor], family: str,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          config: CLIPTextConfig | None = None) -> CLIPTextEncoder:
    """The text encoder of a whole single-file state dict (its `cond_stage_model.*` keys; strict on those).

    family "v1": CLIP ViT-L/14 under `cond_stage_model.transformer.`, with or without `text_model.`.
    family "v2": OpenCLIP ViT-H/14 under `cond_stage_model.model.`. SD-v2 runs only the first 23
    of its 24 blocks (minisd/clip.py), so the last block is ignored, as are text_projection and
    logit_scale, which only CLIP's contrastive training uses.
    config: the encoder's shape; the family's (TEXT_ENCODERS) by default.
    """
    if family not in TEXT_PREFIX:
        raise ValueError(f"family must be one of {sorted(TEXT_PREFIX)}, not {family!r}")
    config, prefix = config or TEXT_ENCODERS[family], TEXT_PREFIX[family]
    text_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not text_sd:
        raise CheckpointError(f"no SD-{family} text encoder in this single file: no key starts with "
                              f"{prefix!r}")
    if family == "v1":
        text_sd, rules, ignore = with_text_model_prefix(text_sd), TEXT_RULES, TEXT_IGNORE
    else:
        text_sd, rules = split_in_proj(text_sd), OPENCLIP_RULES
        ignore = (rf"transformer\.resblocks\.{config.layers}\.", r"text_projection$", r"logit_scale$")
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
    return load_into(encoder, text_sd, rules, ignore=ignore,
                     what=f"single-file text encoder (keys under {prefix})", dtype=dtype, device=device)


def text_encoder_to_ldm(encoder: CLIPTextEncoder, family: str) -> dict[str, torch.Tensor]:
    """The text encoder's weights as a single file holds them (v1 with `text_model.` keys).

    For v2 this writes the blocks the model has (23 for SD-v2), without OpenCLIP's unused last
    block, text_projection and logit_scale. diffusers' convert_open_clip_checkpoint reads such a
    file (without text_projection it takes the q/k/v split size from the model's hidden_size),
    and LDM's own scripts load with strict=False and never run those parts.
    """
    if family == "v1":
        return export(encoder, TEXT_RULES, prefix=TEXT_PREFIX["v1"])
    if family == "v2":
        return fuse_in_proj(export(encoder, OPENCLIP_RULES, prefix=TEXT_PREFIX["v2"]))
    raise ValueError(f"family must be one of {sorted(TEXT_PREFIX)}, not {family!r}")


# ---- The whole single file ---------------------------------------------------------------

# What else a single file may hold: EMA copies of the weights, and the training noise schedule's
# buffers (ldm/models/diffusion/ddpm.py registers them), which minisd recomputes from the config.
EXTRA_KEYS = (r"model_ema\.", r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
              r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
              r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
              r"posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$")
PAD_TOKEN = {"v1": "<|endoftext|>", "v2": "!"}  # as the SD-v1 and SD-v2 hub tokenizers pad
# The schedule of configs/stable-diffusion/v1-inference.yaml (linear_start 0.00085, linear_end
# 0.012, 1000 steps, "scaled_linear" in diffusers' terms), sampled with PLMS as diffusers ships SD.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.27.0", "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                "clip_sample": False, "prediction_type": "epsilon"}
STEP_SD2_BASE = 875000  # the global step stored in SD-2(.1)-base's files; diffusers reads it the same way


def read_single_file(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The tensors of a single file, unwrapped from `state_dict` if it has one, and its global step."""
    raw = read_checkpoint(path)
    sd = raw["state_dict"] if isinstance(raw.get("state_dict"), dict) else raw
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    prefixes = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
    strays = sorted(k for k in tensors
                    if not k.startswith(prefixes) and not any(re.match(p, k) for p in EXTRA_KEYS))
    if strays:
        raise CheckpointError(f"{path} is not an SD single file: {len(strays)} keys belong to no component, "
                              f"e.g. {', '.join(strays[:5])}")
    step = raw.get("global_step")
    return tensors, step if isinstance(step, int) else None


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     family: str | None = None, variant: str | None = None,
                     prediction_type: str | None = None) -> dict:
    """Every component of an SD-v1/v2 (or BK-SDM) single file, as a dict of minisd objects."""
    sd, step = read_single_file(path)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if not unet_sd:
        raise CheckpointError(f"{path} has no U-Net: no key starts with {UNET_PREFIX!r}")
    table = detect_unet(unet_sd, family, variant)
    family = family_of(table.context_dim)
    if prediction_type is None:  # SD-v2 files are 2.x-768 (v) unless the step says 2.x-base (epsilon)
        prediction_type = "v_prediction" if family == "v2" and step != STEP_SD2_BASE else "epsilon"
    if family == "v2" and prediction_type == "v_prediction":
        table = dataclasses.replace(table, upcast_attention=True, sample_size=96)  # SD-2.1-768's U-Net config
    return dict(tokenizer=CLIPTokenizer.builtin(pad_token=PAD_TOKEN[family]),
                text_encoder=text_encoder_from_ldm(sd, family, dtype, device),
                unet=unet_from_ldm(sd, table, dtype, device),
                vae=vae_from_ldm(sd, dtype=dtype, device=device),
                scheduler_config=dict(SD_SCHEDULER, prediction_type=prediction_type))


def save_single_file(components: dict, path: str | Path) -> None:
    """Write one LDM-layout file: .safetensors, or .ckpt with a `state_dict` as the original code saves."""
    unet = components["unet"]
    if not isinstance(components["vae"], AutoencoderKL):
        raise ValueError("a single file holds SD's KL autoencoder, not a tiny one (TAESD): save this "
                         "pipeline as a folder (pipe.save), or load it without --vae")
    family = family_of(unet.config.context_dim)
    sd = {**unet_to_ldm(unet), **vae_to_ldm(components["vae"]),
          **text_encoder_to_ldm(components["text_encoder"], family)}
    path = Path(path)
    if path.suffix == ".ckpt":
        write_checkpoint(path, {"state_dict": sd})
    else:
        write_state_dict(path, sd)
