"""The diffusers LoRA layout: what StableDiffusionPipeline.save_lora_weights writes (as
pytorch_lora_weights.safetensors) and load_lora_weights reads.

A key is the component (`unet.`, `text_encoder.`), the layer's diffusers (U-Net) or transformers (text
encoder) module path, and an ending that names the factor. Current files have peft's endings:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight     down [rank, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight     up [out, rank]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight           (text_model. or not)

Older diffusers wrote the endings of its own LoRA layers, which load_lora_weights still reads: ENDINGS below.

Alpha is not a key: it is in the safetensors metadata, under `lora_adapter_metadata`, the JSON of each
component's peft LoraConfig with keys prefixed by the component (`unet.r`, `unet.lora_alpha`,
`unet.rank_pattern`, `unet.alpha_pattern`, `unet.target_modules`, `unet.use_rslora`, ...). A layer's alpha is
the alpha_pattern entry that matches its path, else lora_alpha; a pattern matches a path as peft's
get_pattern_key reads it, as a regex for the whole path or a dotted tail of it. use_rslora scales by
alpha / sqrt(rank) instead of alpha / rank. Without metadata, diffusers gives every layer alpha = rank
(scale 1; diffusers.utils.peft_utils.get_peft_kwargs), and so does minisd.
"""

import functools
import json
import re
from collections import Counter

import torch

from minisd.lora import LowRank

NAME = "diffusers"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
TEXT_MODEL = "text_model."  # transformers >= 5 saves CLIPTextModel's paths without it; diffusers reads both

# (how a key ends, how the layer's path ends instead, factor), per component. The old attention processors
# hung one LoRA per projection off the attention (`attn1.processor.to_q_lora`); `.processor` is dropped first.
_PROJECTIONS = {"unet": dict(to_q="to_q", to_k="to_k", to_v="to_v", to_out="to_out.0"),
                "text_encoder": dict(to_q="q_proj", to_k="k_proj", to_v="v_proj", to_out="out_proj")}
ENDINGS = {
    component: [
        (".lora_A.weight", "", "down"), (".lora_B.weight", "", "up"),                   # peft
        *([(".lora.down.weight", "", "down"), (".lora.up.weight", "", "up")] if component == "unet" else
          [(".lora_linear_layer.down.weight", "", "down"), (".lora_linear_layer.up.weight", "", "up")]),
        *[(f".{p}_lora.{f}.weight", f".{layer}", f)
          for p, layer in projections.items() for f in ("down", "up")],
    ]
    for component, projections in _PROJECTIONS.items()
}


def claims(keys: list[str]) -> bool:
    return any("lora" in k for k in keys)


def layer_name(component: str, native: str, diffusers_path: str) -> str:
    return diffusers_path


def parse(key: str) -> tuple[str, str, str] | None:
    """(component, layer path, factor) of a key, or None where it is not of this layout."""
    component, _, rest = key.partition(".")
    rest = rest.replace(".processor.", ".")
    for ending, tail, factor in ENDINGS.get(component, ()):
        if rest.endswith(ending):
            path = rest.removesuffix(ending) + tail
            if component == "text_encoder" and not path.startswith(TEXT_MODEL):
                path = TEXT_MODEL + path
            return component, path, factor
    return None


def _pattern_value(patterns: dict, paths: list[str]):
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", path) for path in paths):
            return value
    return None


@functools.lru_cache(maxsize=8)
def _read_config(metadata_json: str, component: str) -> dict:
    try:
        config = json.loads(metadata_json)
        prefix = component + "."
        return {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"its {METADATA_KEY} metadata is not the JSON object diffusers writes") from None


def alpha(metadata: dict[str, str], component: str, layer: str, rank: int) -> float | None:
    """A layer's alpha from the file's LoraConfig metadata; None (alpha = rank) where the file has none."""
    if METADATA_KEY not in metadata:
        return None
    config = _read_config(metadata[METADATA_KEY], component)
    if not config:
        return None
    # the text encoder's patterns may name its paths with or without text_model., as its model had them
    paths = [layer, layer.removeprefix(TEXT_MODEL)]
    value = _pattern_value(config.get("alpha_pattern") or {}, paths)
    value = float(config.get("lora_alpha", 8) if value is None else value)  # 8: LoraConfig's default
    # rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732): alpha / sqrt(rank) is alpha * sqrt(rank) / rank
    return value * rank ** 0.5 if config.get("use_rslora") else value


def _config(layers: dict[str, LowRank], component: str) -> dict:
    """A LoraConfig for one component: the most common rank and alpha, and patterns for the other layers.
    The text encoder's paths go without text_model., so that they match its layers with or without it."""
    paths = {(p.removeprefix(TEXT_MODEL) if component == "text_encoder" else p): u for p, u in layers.items()}
    ranks = {p: u.rank for p, u in paths.items()}
    alphas = {p: float(u.rank if u.alpha is None else u.alpha) for p, u in paths.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": lora_alpha, "target_modules": sorted(paths),
            "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != lora_alpha}}


def write(lora: dict[str, dict[str, LowRank]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft's endings, and each component's LoraConfig in the metadata (as save_lora_weights writes it when
    given the adapter metadata), so that diffusers scales every layer by its own alpha."""
    tensors, config = {}, {}
    for component, layers in lora.items():
        if not layers:
            continue
        for path, update in layers.items():
            tensors |= {f"{component}.{path}.lora_A.weight": update.down,
                        f"{component}.{path}.lora_B.weight": update.up}
        config |= {f"{component}.{k}": v for k, v in _config(layers, component).items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
