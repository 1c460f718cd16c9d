"""LoRA: low-rank adaptation of a model's layers (Hu et al., 2021, arXiv 2106.09685).

A frozen weight W [out, in] gets a trainable update of rank r, W + (alpha / r) * up @ down, with down [r, in]
and up [out, r] (the paper's A and B, sec. 4.1). up starts at zero, so training starts from the unchanged
model. The scale alpha / r is there so that the learning rate needs less retuning when r changes (sec. 4.1).

Two uses:
- training: `inject_lora` wraps chosen Linear layers in `LoRALinear` and Conv2d layers in
  `LoRAConv2d`, whose down/up are all that trains (`lora_parameters`). `merge_lora` folds each update into
  its weight, so sampling runs at full speed; `unmerge_lora` gives the exact weights back, and
  `remove_lora` the plain model.
- files: a LoRA file holds, per layer, a `LowRank` (down, up, alpha). `lora_layers` reads them off a model
  with LoRA layers; `add_low_ranks` adds a file's updates to a model's weights, each file with its own
  strength. Files for SD also update 1x1 and 3x3 convs (SD-v1's proj_in/proj_out, ResBlock convs), whose down
  and up are conv weights [r, in, kh, kw] and [out, r, 1, 1]: the same product, read as a conv weight.

Layers go by the model's own names (the U-Net's `down.1.blocks.0.attn.transformer_blocks.0.attn1.to_q`, the
text encoder's `layers.3.attn.to_v`); minisd/checkpoints/lora_*.py translate them to the file layouts.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`base(x) + (alpha / rank) * up(down(dropout(x)))`, with `base` (an nn.Linear) frozen.

    down starts as nn.Linear does (Kaiming-uniform, as peft and kohya's sd-scripts start it), up at zero.
    The update may be kept in another dtype than the base (fp32 beside a half-precision model).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kwargs = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.down, self.up = self.factors(base, rank, kwargs)
        nn.init.zeros_(self.up.weight)
        # while merged: the base weight as it was, so that unmerging restores it bit for bit
        self.register_buffer("unmerged_weight", None, persistent=False)

    @staticmethod
    def factors(base: nn.Linear, rank: int, kwargs: dict) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(base.in_features, rank, **kwargs), nn.Linear(rank, base.out_features, **kwargs)

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        update = self.up(self.down(self.dropout(x).to(self.down.weight.dtype)))
        return out + (self.scale * update).to(out.dtype)

    def low_rank(self) -> "LowRank":
        return LowRank(self.down.weight.detach(), self.up.weight.detach(), self.alpha)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base.weight
        self.unmerged_weight = weight.data
        weight.data = (weight.float() + self.low_rank().delta(weight.shape)).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data = self.unmerged_weight
            self.unmerged_weight = None


class LoRAConv2d(LoRALinear):
    """The same update on a Conv2d (LoCon, as kohya's tools and peft adapt ResBlock convs): down is a conv
    with the base's kernel, stride and padding into `rank` channels, up a 1x1 conv out of them, so that
    up(down(x)) is one conv whose weight is up @ down [out, in, kh, kw]: mergeable like a Linear's."""

    @staticmethod
    def factors(base: nn.Conv2d, rank: int, kwargs: dict) -> tuple[nn.Module, nn.Module]:
        if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros":
            raise ValueError("LoRA wraps plain convs only (groups 1, no dilation, zero padding)")
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, **kwargs)
        return down, nn.Conv2d(rank, base.out_channels, 1, **kwargs)


@dataclass
class LowRank:
    """One layer's update as a LoRA file holds it: (alpha / rank) * up @ down.

    down: [rank, in] (a conv's: [rank, in, kh, kw]); up: [out, rank] (or [out, rank, 1, 1]);
    alpha: None where the file gives none, which means alpha = rank (scale 1), as diffusers and kohya read it.
    """
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def fits(self, weight_shape: torch.Size) -> bool:
        """Whether the update has the shape of a weight (a Linear's [out, in] or a conv's [out, in, kh, kw]);
        a 1x1 conv's update fits a Linear of the same sizes and the other way round."""
        up, down = self.up, self.down
        return (up.ndim in (2, 4) and all(s == 1 for s in up.shape[2:]) and up.shape[1] == down.shape[0]
                and up.shape[0] == weight_shape[0] and down[0].numel() == math.prod(weight_shape[1:]))

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The update of the weight, in fp32: scale * up @ down, as a weight of `weight_shape`."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # [out, in * kh * kw]
        return (self.scale * product).reshape(weight_shape)


def matches(name: str, targets: Iterable[str]) -> bool:
    """Whether a layer's name ends with one of `targets`, in whole dotted segments ("to_q" matches
    "...attn1.to_q"; "attn2.to_q" only the cross-attention's), as peft reads `target_modules`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can update, by name: every Linear and Conv2d, and every LoRA layer as one layer (not
    the Linears or convs inside it)."""
    wrapped = [name + "." for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, LoRALinear))
            and not any(name.startswith(w) for w in wrapped)}


def layer_weight(layer: nn.Module) -> torch.Tensor:
    return layer.base.weight if isinstance(layer, LoRALinear) else layer.weight


def targeted(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The plain Linear and Conv2d layers whose names end with one of `targets`: what inject_lora wraps."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [name for name, m in adaptable_layers(model).items()
            if type(m) in (nn.Linear, nn.Conv2d) and matches(name, targets)]


def inject_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float | None = None,
                dropout: float = 0.0, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every Linear whose name ends with one of `targets` (see `matches`) in a LoRALinear, and every such
    Conv2d in a LoRAConv2d, in place.

    Returns the wrapped layers' names. The wrapped layers are frozen; the model's other parameters are left
    as they are: freeze the model first (model.requires_grad_(False)) to train the LoRA alone.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = targeted(model, targets)
    if not names:
        raise ValueError(f"no Linear or Conv2d layer of the model is named ...{' or ...'.join(targets)} "
                         "(names are minisd's: U-Net attention to_q/to_k/to_v/to_out, ResBlock conv1/conv2, "
                         "the text encoder's attn.to_q ..., fc1, fc2); were they given LoRA layers already?")
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, attr)
        wrapper = LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear
        setattr(owner, attr, wrapper(layer, rank, alpha, dropout, dtype))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters LoRA trains: every LoRA layer's down and up weights."""
    return [p for m in lora_modules(model).values() for p in (m.down.weight, m.up.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under the model's state_dict names (`{layer}.down.weight`, `{layer}.up.weight`), to
    checkpoint and restore with model.load_state_dict(sd, strict=False)."""
    return {f"{name}.{part}.weight": getattr(m, part).weight.detach()
            for name, m in lora_modules(model).items() for part in ("down", "up")}


def lora_layers(model: nn.Module) -> dict[str, LowRank]:
    """What a LoRA file holds for this model: each LoRA layer's down, up and alpha, by layer name."""
    return {name: m.low_rank() for name, m in lora_modules(model).items()}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer's update into its base weight: the forward pass is then the plain layer's."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: the base weights come back exactly as they were."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put every LoRA layer's base layer back in its place, its weight exactly as before the LoRA (merged or
    not): the plain model, without the LoRA."""
    for name, m in lora_modules(model).items():
        m.unmerge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base)
    return model


@torch.no_grad()
def add_low_ranks(model: nn.Module, updates: dict[str, LowRank], strength: float = 1.0) -> None:
    """Add `strength` times each update to its layer's weight (a file's LoRA, merged for sampling).

    The updates must fit (checked by the readers in minisd/checkpoints/lora_files.py). The sum is taken in
    fp32 and stored in the weight's dtype, in place (channels_last conv weights stay channels_last).
    """
    layers = adaptable_layers(model)
    for name, update in updates.items():
        weight = layer_weight(layers[name])
        weight.copy_(weight.float() + strength * update.delta(weight.shape).to(weight.device))

