"""LoRA files: read one in any layout SD users exchange, check that it fits the model, write one.

    layout     module             keys (U-Net; the text encoder's alike)
    minisd     lora_minisd.py     unet.{minisd name}.down.weight, .up.weight, .alpha
    diffusers  lora_diffusers.py  unet.{diffusers path}.lora_A.weight, .lora_B.weight; alpha in the metadata
    kohya      lora_kohya.py      lora_unet_{diffusers path, "." as "_"}.lora_down.weight, .lora_up.weight,
                                  .alpha

A LoRA in memory is {component: {layer: LowRank}} (minisd/lora.py), components "unet" and "text_encoder",
layers by minisd's names. diffusers and kohya name a layer by its diffusers (U-Net) or transformers (text
encoder) module path, which the full-model rule tables of minisd/checkpoints/diffusers.py give: LoRA files
need no rule tables of their own. Each layout module says how its keys read (`parse`), how it names a layer
(`layer_name`), where a layer's alpha is when no key holds it (`alpha`), and what it writes (`write`).

Loading is strict, as for checkpoints: every key must name a layer of the model, with its pair of factors,
in the layer's shape; a file that does not fit is refused whole, naming its keys.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minisd.checkpoints import lora_diffusers, lora_kohya, lora_minisd
from minisd.checkpoints.diffusers import TEXT_RULES, unet_rules
from minisd.checkpoints.files import find_weights, read_metadata, read_state_dict, write_state_dict
from minisd.checkpoints.remap import CheckpointError, rename
from minisd.lora import LowRank, adaptable_layers, layer_weight

LoRA = dict[str, dict[str, LowRank]]
# detection order: kohya's prefixes, then any "lora" in a key (diffusers), then minisd's plain names
LAYOUTS = {m.NAME: m for m in (lora_kohya, lora_diffusers, lora_minisd)}
WEIGHT_NAME = "pytorch_lora_weights"  # the file name diffusers' save_lora_weights gives (.safetensors, .bin)


@dataclass
class LoRAFile:
    """A LoRA file as read, before it meets a model: its tensors, safetensors metadata and layout."""
    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layout: str


def open_lora(path: str | Path) -> LoRAFile:
    """Read a LoRA file (.safetensors, or a pickled .bin/.pt read with weights_only) or a folder holding
    pytorch_lora_weights.safetensors, and tell its layout from its keys."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path, (WEIGHT_NAME,))
    tensors = read_state_dict(path)
    if not tensors:
        raise ValueError(f"{path} holds no tensors, so no LoRA")
    keys = sorted(tensors)
    layout = next((name for name, module in LAYOUTS.items() if module.claims(keys)), None)
    if layout is None:
        raise ValueError(f"{path} is not a LoRA file in a layout minisd reads (minisd, diffusers, kohya): "
                         f"its keys ({_first(keys)}) are none of theirs")
    return LoRAFile(str(path), tensors, read_metadata(path), layout)


def diffusers_paths(component: str, model: nn.Module) -> dict[str, str]:
    """Each layer a LoRA can update, minisd name -> diffusers (U-Net) / transformers (text encoder) path."""
    rules = unet_rules(model.config) if component == "unet" else TEXT_RULES
    return {name: rename(name + ".weight", rules).removesuffix(".weight") for name in adaptable_layers(model)}


def layer_names(layout: str, models: Mapping[str, nn.Module]) -> dict[str, dict[str, str]]:
    """{component: {minisd layer name: the layout's name for it}}."""
    module = LAYOUTS[layout]
    return {c: {native: module.layer_name(c, native, path)
                for native, path in diffusers_paths(c, model).items()} for c, model in models.items()}


def read_lora(source: str | Path | LoRAFile, models: Mapping[str, nn.Module]) -> LoRA:
    """A LoRA file's updates under minisd's layer names, checked to fit `models` ({"unet": unet,
    "text_encoder": text_encoder}); a CheckpointError names the keys of a file that does not fit."""
    file = source if isinstance(source, LoRAFile) else open_lora(source)
    layout = LAYOUTS[file.layout]
    native_of = {c: {name: native for native, name in names.items()}
                 for c, names in layer_names(file.layout, models).items()}
    factors, keys_of, unplaced = {}, {}, []
    for key, tensor in file.tensors.items():
        parsed = layout.parse(key)
        native = native_of.get(parsed[0], {}).get(parsed[1]) if parsed else None
        if native is None:
            unplaced.append(key)
            continue
        component, name, factor = parsed
        factors.setdefault((component, native, name), {})[factor] = tensor
        keys_of.setdefault((component, native, name), []).append(key)

    lora, misshaped = {c: {} for c in models}, []
    for (component, native, name), parts in factors.items():
        if "down" not in parts or "up" not in parts:
            unplaced += keys_of[component, native, name]
            continue
        alpha = parts["alpha"].item() if "alpha" in parts else layout.alpha(file.metadata, component, name,
                                                                              parts["down"].shape[0])
        update = LowRank(parts["down"], parts["up"], alpha)
        weight = layer_weight(models[component].get_submodule(native))
        if update.fits(weight.shape):
            lora[component][native] = update
        else:
            misshaped.append(f"{name}: up {tuple(update.up.shape)} @ down {tuple(update.down.shape)} for a "
                             f"{tuple(weight.shape)} weight")
    _refuse_misfits(file, unplaced, misshaped)
    return lora


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _refuse_misfits(file: LoRAFile, unplaced: list[str], misshaped: list[str]) -> None:
    """One line that says what does not fit, with the first keys of each kind and their number."""
    problems = []
    if unplaced:
        problems.append(f"{len(unplaced)} of its {len(file.tensors)} keys name no layer of the model or miss "
                        f"their other factor ({_first(sorted(unplaced))})")
    if misshaped:
        problems.append(f"{len(misshaped)} layers have another shape ({_first(sorted(misshaped))})")
    if problems:
        raise CheckpointError(f"LoRA {file.name} ({file.layout} layout) does not fit this model: "
                              + "; ".join(problems) + ". It was made for another model (SD family, BK-SDM "
                              "variant), or holds more than LoRA layers (LoHa, LoKr, DoRA)")


def write_lora(path: str | Path, lora: LoRA, models: Mapping[str, nn.Module],
               layout: str = "diffusers") -> None:
    """Write a LoRA (minisd's names, e.g. {"unet": lora_layers(unet), "text_encoder": ...}) in a layout.
    diffusers' load_lora_weights reads a file named pytorch_lora_weights.safetensors by default."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    names = layer_names(layout, {c: models[c] for c in lora})
    unknown = [f"{c}.{n}" for c, layers in lora.items() for n in layers if n not in names[c]]
    if unknown:
        raise ValueError(f"the LoRA names layers the model does not have ({_first(unknown)})")
    renamed = {c: {names[c][n]: update for n, update in layers.items()} for c, layers in lora.items()}
    tensors, metadata = LAYOUTS[layout].write(renamed)
    write_state_dict(path, tensors, metadata)
