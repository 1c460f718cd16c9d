"""open_clip's checkpoint layout for CLIP ViT models, and `load_clip`.

An open_clip CLIP state dict (open_clip/model.py, CLIP) holds the image tower under `visual.`
(conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.{i}, ln_post, proj),
the text tower at the top level (token_embedding, positional_embedding, transformer.resblocks.{i},
ln_final, text_projection) and logit_scale. Both towers' blocks are the resblocks whose keys
minisd/checkpoints/ldm.py already maps for SD-v2's OpenCLIP text encoder: its rules and its fused
q/k/v split are reused here. The architecture comes from open_clip's model-config JSON
(model_configs/ViT-g-14.json, or `model_cfg` in a hub repo's open_clip_config.json).
"""

import dataclasses
from pathlib import Path

import huggingface_hub
import torch

from minisd.checkpoints import hub
from minisd.checkpoints.files import read_checkpoint, read_json
from minisd.checkpoints.hub import CACHE
from minisd.checkpoints.ldm import OPENCLIP_RULES, split_in_proj
from minisd.checkpoints.remap import Rule, load_into
from minisd.clip import OPENCLIP_VIT_H14
from minisd.clip_vision import OPENAI_MEAN, OPENAI_STD, VisionConfig
from minisd.metrics.clip_model import PRESETS, CLIPConfig, CLIPModel

VISION_RULES: tuple[Rule, ...] = (  # a tuple: inner tables must be hashable
    ("patch_embed.", "conv1."),
    ("position_embedding", "positional_embedding"),  # the image tower's is a bare Parameter
    ("norm_pre.", "ln_pre."),
    ("norm_post.", "ln_post."),
    ("projection", "proj"),
    *OPENCLIP_RULES,  # layers.{i} -> transformer.resblocks.{i}, and the names inside a block
)
RULES: list[Rule] = [
    ("visual.", "visual.", VISION_RULES),
    ("text.", "", tuple(OPENCLIP_RULES)),  # open_clip keeps the text tower's keys at the top level
]

INCEPTION = (0.5, 0.5, 0.5)  # open_clip's INCEPTION_MEAN and _STD
# (model, pretrained tag) -> hub repo, mean, std: open_clip/pretrained.py's entries for these presets
PRETRAINED = {
    ("ViT-g-14", "laion2b_s34b_b88k"): ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", OPENAI_MEAN, OPENAI_STD),
    ("ViT-g-14", "laion2b_s12b_b42k"): ("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", OPENAI_MEAN, OPENAI_STD),
    ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", OPENAI_MEAN, OPENAI_STD),
    ("ViT-L-14", "laion2b_s32b_b82k"): ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", INCEPTION, INCEPTION),
    ("ViT-B-32", "laion2b_s34b_b79k"): ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", OPENAI_MEAN, OPENAI_STD),
    # OpenAI's weights, as open_clip fetches them from timm's hub copy
    ("ViT-B-32-quickgelu", "openai"): ("timm/vit_base_patch32_clip_224.openai", OPENAI_MEAN, OPENAI_STD),
    ("ViT-bigG-14", "laion2b_s39b_b160k"): ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", OPENAI_MEAN,
                                            OPENAI_STD),
}
# open_clip's hub names, its order
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# open_clip config keys minisd's CLIP does not build, with the value that leaves them out
_BOTH = {"ls_init_value": None, "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
         "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
         "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}
PLAIN = {"vision_cfg": {**_BOTH, "attentional_pool": False, "no_ln_pre": False, "pool_type": "tok",
                        "final_ln_after_pool": False, "pos_embed_type": "learnable", "timm_model_name": None},
         "text_cfg": {**_BOTH, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
                      "proj_bias": False, "proj_type": "linear", "hf_model_name": None,
                      "hf_tokenizer_name": None, "tokenizer_kwargs": None}}


def config_from_open_clip(cfg: dict, mean=OPENAI_MEAN, std=OPENAI_STD) -> CLIPConfig:
    """A CLIPConfig from an open_clip model config (model_configs/NAME.json); missing keys take
    open_clip's defaults (CLIPVisionCfg, CLIPTextCfg). Options minisd does not build are refused."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    unsupported = [f"{k}={cfg[k]!r}" for k in ("custom_text", "multimodal_cfg",
                                               "init_logit_bias") if cfg.get(k)]
    for part, plain in PLAIN.items():
        unsupported += [f"{part}.{k}={v!r}"
                        for k, v in cfg.get(part, {}).items() if k in plain and v != plain[k]]
    if isinstance(vision.get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers (a ResNet image tower)")
    if unsupported:
        raise ValueError(f"open_clip model config not supported: {', '.join(unsupported)}. minisd loads "
                         "plain CLIP ViTs (such as ViT-B-32, ViT-L-14, ViT-H-14, ViT-g-14, ViT-bigG-14 and "
                         "their -quickgelu forms).")
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"open_clip model config not supported: non-square "
                             f"vision_cfg.image_size={image_size}")
        image_size = image_size[0]
    activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    width, text_width = vision.get("width", 768), text.get("width", 512)
    return CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=vision.get("patch_size", 16), width=width,
                            layers=vision.get("layers", 12), heads=width // vision.get("head_width", 64),
                            mlp_width=int(width * vision.get("mlp_ratio", 4.0)), embed_dim=cfg["embed_dim"],
                            activation=activation),
        text=dataclasses.replace(OPENCLIP_VIT_H14, width=text_width, heads=text.get("heads", 8),
                                 layers=text.get("layers", 12),
                                 mlp_width=int(text_width * text.get("mlp_ratio", 4.0)),
                                 vocab_size=text.get("vocab_size", 49408),
                                 max_positions=text.get("context_length", 77), activation=activation),
        image_mean=tuple(mean), image_std=tuple(std))


def read_open_clip(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip weight file's state dict, unwrapped as open_clip's load_state_dict does
    (a `state_dict` entry; the `module.` prefix of DDP-saved training checkpoints)."""
    sd = read_checkpoint(path)
    sd = sd["state_dict"] if isinstance(sd.get("state_dict"), dict) else sd
    if next(iter(sd), "").startswith("module."):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def download(repo_id: str, cache_dir: Path = CACHE) -> Path:
    """The open_clip weight file of a hub repo, safetensors first; from the cache when offline."""
    errors = []
    for name in WEIGHT_FILES:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache_dir,
                                                        local_files_only=not hub.reachable()))
        except huggingface_hub.errors.RepositoryNotFoundError:
            raise FileNotFoundError(f"no model {repo_id!r} on the hub") from None
        except Exception as e:  # not in the repo, no network, offline mode: try the next name
            errors.append(f"{name}: {type(e).__name__}")
    raise ConnectionError(
        f"cannot download the open_clip weights of {repo_id} ({'; '.join(errors)}) and they are not in "
        f"{cache_dir}. On a machine with network, run `hf download {repo_id} {WEIGHT_FILES[0]} --local-dir "
        f"DIR` (or {WEIGHT_FILES[1]}), copy DIR here (e.g. to weights/{repo_id.split('/')[-1]}/) and pass "
        "that folder or file as `pretrained`.")


def _weights_in(folder: Path) -> Path:
    for name in (*WEIGHT_FILES, "open_clip_pytorch_model.pt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no open_clip weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def locate(name_or_path: str, pretrained: str, cache_dir: Path) -> tuple[Path, tuple, tuple]:
    """The weights' local path (downloading a known tag or a hub repo) and the normalisation they use."""
    if Path(name_or_path).exists():
        return Path(name_or_path), OPENAI_MEAN, OPENAI_STD
    if (name_or_path, pretrained) in PRETRAINED:
        repo, mean, std = PRETRAINED[name_or_path, pretrained]
        return download(repo, cache_dir), mean, std
    if Path(pretrained).exists():
        return Path(pretrained), OPENAI_MEAN, OPENAI_STD
    if pretrained.count("/") == 1:  # a hub repo id, owner/name
        return download(pretrained, cache_dir), OPENAI_MEAN, OPENAI_STD
    tags = [tag for name, tag in PRETRAINED if name == name_or_path]
    raise ValueError(f"unknown pretrained weights {pretrained!r} for {name_or_path}: pass one of {tags}, "
                     "a hub repo id or a local weight file")


def _model_config(source: Path, name: str, config: dict | None, mean: tuple, std: tuple) -> CLIPConfig:
    """From `config`, else the open_clip_config.json beside the weights (as the hub repos have it), else the
    preset."""
    folder = source if source.is_dir() else source.parent
    if config is None and (folder / "open_clip_config.json").is_file():
        hub_config = read_json(folder / "open_clip_config.json")
        config, preprocess = hub_config.get("model_cfg"), hub_config.get("preprocess_cfg", {})
        mean, std = preprocess.get("mean", mean), preprocess.get("std", std)
        if (preprocess.get("interpolation", "bicubic"),
            preprocess.get("resize_mode", "shortest")) != ("bicubic", "shortest"):
            raise ValueError(f"{folder / 'open_clip_config.json'}: only the bicubic, shortest-side resize is "
                             "implemented")
    if config is not None:
        return config_from_open_clip(config, mean, std)
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], image_mean=tuple(mean), image_std=tuple(std))
    raise ValueError(f"no model config for {source}: pass config= (the open_clip model-config dict, e.g. "
                     "model_configs/ViT-g-14.json) or put the hub's open_clip_config.json beside the weights")


def load_clip(name_or_path: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k",
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              config: dict | None = None, cache_dir: Path = CACHE) -> CLIPModel:
    """An open_clip CLIP ViT as a minisd CLIPModel, in eval mode.

    name_or_path: a preset name (`PRESETS`: "ViT-g-14", "ViT-H-14", ...), or a local weight file
        (.safetensors, .bin, .pt) or folder (open_clip_model.safetensors or open_clip_pytorch_model.bin,
        and open_clip_config.json as in the hub repos).
    pretrained: with a preset name, a tag of `PRETRAINED` (downloaded into weights/hub/), a hub repo
        id, or a local weight file or folder; unused when name_or_path is a path.
    config: an open_clip model config (a dict like model_configs/ViT-g-14.json); it describes the
        architecture instead of the preset or the folder's open_clip_config.json.
    """
    if not Path(name_or_path).exists() and name_or_path not in PRESETS and config is None:
        raise ValueError(f"{name_or_path!r} is neither a local path nor a known model "
                         f"({', '.join(PRESETS)}); "
                         "pass config= (an open_clip model-config dict) for other ViTs")
    source, mean, std = locate(name_or_path, pretrained, cache_dir)
    cfg = _model_config(source, name_or_path, config, mean, std)
    path = _weights_in(source) if source.is_dir() else source
    with torch.device("meta"):
        model = CLIPModel(cfg)
    load_into(model, split_in_proj(read_open_clip(path)), RULES, shape_fix=_scalar_logit_scale,
              what=f"open_clip weights {path}", dtype=dtype, device=device)
    return model.eval()


def _scalar_logit_scale(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Some open_clip checkpoints store logit_scale as [1], others as a scalar (open_clip reshapes too)."""
    return tensor.reshape(shape) if key == "logit_scale" and tensor.numel() == 1 else tensor
