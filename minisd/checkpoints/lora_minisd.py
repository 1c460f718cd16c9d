"""minisd's own LoRA layout: each layer under minisd's name, as a LoRALinear holds it (minisd/lora.py).

    unet.{layer}.down.weight   [rank, in]
    unet.{layer}.up.weight     [out, rank]
    unet.{layer}.alpha         a scalar: the update is (alpha / rank) * up @ down
    text_encoder.{layer}....   the same for the text encoder

Less the component, these are the names of the LoRA weights in the model's own state_dict once it has
LoRALinear layers. Layer names need no translation, so the file carries none of diffusers' module paths.
"""

import torch

from minisd.lora import LowRank

NAME = "minisd"
COMPONENTS = ("unet", "text_encoder")
ENDINGS = {".down.weight": "down", ".up.weight": "up", ".alpha": "alpha"}


def claims(keys: list[str]) -> bool:
    """Every key is a component's layer and an ending of ENDINGS (minisd's names never hold 'lora')."""
    return all(k.split(".")[0] in COMPONENTS and k.endswith(tuple(ENDINGS)) and "lora" not in k for k in keys)


def layer_name(component: str, native: str, diffusers_path: str) -> str:
    return native


def parse(key: str) -> tuple[str, str, str] | None:
    """(component, layer, factor) of a key, or None where it is not of this layout."""
    component, _, rest = key.partition(".")
    for ending, factor in ENDINGS.items():
        if component in COMPONENTS and rest.endswith(ending):
            return component, rest.removesuffix(ending), factor
    return None


def alpha(metadata: dict[str, str], component: str, layer: str, rank: int) -> float | None:
    return None  # the file's .alpha keys carry it


def write(lora: dict[str, dict[str, LowRank]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for component, layers in lora.items():
        for layer, update in layers.items():
            alpha = update.rank if update.alpha is None else update.alpha
            tensors |= {f"{component}.{layer}.down.weight": update.down,
                        f"{component}.{layer}.up.weight": update.up,
                        f"{component}.{layer}.alpha": torch.tensor(float(alpha))}
    return tensors, {"format": "pt"}
