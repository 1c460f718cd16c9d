"""The kohya layout: LoRA files of kohya's sd-scripts, which AUTOMATIC1111's web UI, ComfyUI and diffusers'
load_lora_weights read, and the layout most SD LoRAs are shared in.

A layer is `lora_unet_` or `lora_te_` + its diffusers (U-Net) or transformers (text encoder) module path with
every "." made "_", then an ending:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [rank, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, rank]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              a scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                   ...

No alpha: alpha = rank (scale 1). "_" joins a path's segments and the words of a name alike, so a key cannot
be read back into a path by itself: the model's layers, named the same way, are the table it is looked up in
(lora_files.py). SD-v2's text encoder is OpenCLIP ViT-H/14, but sd-scripts loads it as transformers'
CLIPTextModel of 23 layers (as minisd does), so an SD-v2 LoRA names it as SD-v1's: `lora_te_text_model_...`.
sd-scripts may build SD-v2's U-Net with 1x1-conv proj_in/proj_out, whose factors are then conv-shaped
[rank, in, 1, 1]; minisd's Linear proj_in takes them all the same (LowRank.fits).
"""

from collections import Counter

import torch

from minisd.lora import LowRank

NAME = "kohya"
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
ENDINGS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def claims(keys: list[str]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) for k in keys)


def layer_name(component: str, native: str, diffusers_path: str) -> str:
    return PREFIXES[component] + diffusers_path.replace(".", "_")


def parse(key: str) -> tuple[str, str, str] | None:
    """(component, layer, factor) of a key, or None where it is not of this layout."""
    layer, dot, rest = key.partition(".")
    factor = ENDINGS.get(dot + rest)
    component = next((c for c, prefix in PREFIXES.items() if layer.startswith(prefix)), None)
    return (component, layer, factor) if factor and component else None


def alpha(metadata: dict[str, str], component: str, layer: str, rank: int) -> float | None:
    return None  # the file's .alpha keys carry it


def write(lora: dict[str, dict[str, LowRank]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata kohya's sd-scripts writes (`ss_network_*`: its network module, and the
    most common rank and alpha, which its tools show)."""
    tensors = {}
    for layers in lora.values():
        for layer, update in layers.items():
            alpha = update.rank if update.alpha is None else update.alpha
            tensors |= {f"{layer}.lora_down.weight": update.down, f"{layer}.lora_up.weight": update.up,
                        f"{layer}.alpha": torch.tensor(float(alpha))}
    updates = [u for layers in lora.values() for u in layers.values()]
    ranks = Counter(u.rank for u in updates) or Counter([0])
    alphas = Counter(float(u.rank if u.alpha is None else u.alpha) for u in updates) or Counter([0.0])
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return tensors, {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                     "ss_network_alpha": str(float(alpha))}
