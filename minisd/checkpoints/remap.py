"""Key remapping between minisd's native parameter names and a checkpoint layout.

A layout is described by data: an ordered list of rules, each a pair of name templates
`(native, layout)`, such as `("down.{s}.{b}.res.", "down_blocks.{s}.resnets.{b}.")`.
`{name}` stands for a run of digits, and a template matches whole dot-separated segments.
The same list translates both ways, so loading and saving can never drift apart.

Translation scans a key from left to right. At each segment boundary the first rule whose
template matches there is applied and the scan moves past the match; where none matches,
one segment is copied unchanged. So every part of a key is rewritten at most once, and the
order of the rules only matters where two of them could match at the same place.

A rule may carry a third element, an inner rule table: after it matches, the rest of the key
is translated with those rules alone. That scopes renames to one kind of block, e.g. LDM's
`in_layers.0` -> `norm1` inside ResBlocks without touching a transformer block's own `norm1`.

Loading is strict (as in nanoGPT's `from_pretrained`): every key the model needs must be
present with the right shape, and every key in the file must be used or explicitly ignored.
All problems are gathered into one `CheckpointError` that names each key.
"""

import functools
import re
from typing import Callable, Iterable

import torch

Rule = tuple  # (native, layout) or (native, layout, inner rules)
ShapeFix = Callable[[str, torch.Tensor, torch.Size], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshaped keys."""


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    # re.split alternates literal text and placeholder names: lit, name, lit, name, ...
    pattern = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    if not template.endswith("."):
        pattern += r"(?=\.|$)"  # a template that does not end in a dot must end a segment
    return re.compile(pattern)


@functools.lru_cache(maxsize=256)
def _compile(rules: tuple[Rule, ...], reverse: bool) -> list[tuple[re.Pattern, str, tuple]]:
    compiled = []
    for native, layout, *inner in rules:
        source, target = (layout, native) if reverse else (native, layout)
        compiled.append((_template_regex(source), target, tuple(inner[0]) if inner else None))
    return compiled


def rename(key: str, rules: Iterable[Rule], reverse: bool = False) -> str:
    """Translate one key: native -> layout, or layout -> native with `reverse=True`."""
    compiled = _compile(tuple(rules), reverse)
    out, pos = [], 0
    while pos < len(key):
        for regex, target, inner in compiled:
            m = regex.match(key, pos)
            if m:
                out.append(target.format(**m.groupdict()))
                pos = m.end()
                if inner is not None:  # the rest of the key belongs to the inner table
                    return "".join(out) + rename(key[pos:], inner, reverse)
                break
        else:
            end = key.find(".", pos)
            end = len(key) if end < 0 else end + 1
            out.append(key[pos:end])
            pos = end
    return "".join(out)


def conv1x1_as_linear(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Shape fix for 1x1 convs stored where the model has a Linear (or the reverse).

    The two hold the same numbers: a conv weight [out, in, 1, 1] is a linear weight [out, in].
    """
    if tensor.numel() == shape.numel() and tensor.shape[:2] == shape[:2]:
        return tensor.reshape(shape)
    return tensor


def _listing(title: str, keys: list[str], limit: int = 40) -> str:
    shown = "\n".join(f"    {k}" for k in keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n{shown}{more}"


def load_into(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor], rules: Iterable[Rule],
              ignore: Iterable[str] = (), shape_fix: ShapeFix | None = None, what: str = "checkpoint",
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.nn.Module:
    """Fill `model` from `checkpoint` (keys in a layout's names); strict.

    ignore: regexes for layout keys that are known extras (EMA copies, schedule buffers...).
    The model may live on the meta device: its tensors are then replaced by the checkpoint's.
    """
    rules = list(rules)
    ignored = [re.compile(p) for p in ignore]
    want = model.state_dict()
    layout_of = {native: rename(native, rules) for native in want}

    missing = sorted(layout_of[n] for n in want if layout_of[n] not in checkpoint)
    used = set(layout_of.values())
    unexpected = sorted(k for k in checkpoint if k not in used and not any(r.match(k) for r in ignored))

    native_sd, misshaped = {}, []
    for native, target in want.items():
        layout = layout_of[native]
        if layout not in checkpoint:
            continue
        tensor = checkpoint[layout]
        if shape_fix is not None and tensor.shape != target.shape:
            tensor = shape_fix(native, tensor, target.shape)
        if tensor.shape != target.shape:
            misshaped.append(f"{layout}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
            continue
        cast = dtype if tensor.is_floating_point() and dtype else tensor.dtype  # integer buffers keep theirs
        native_sd[native] = tensor.to(device=device, dtype=cast)

    if missing or unexpected or misshaped:
        # one line that says what and where; the keys follow it
        found = ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "wrongly shaped"))
        counts = ", ".join(f"{len(keys)} {name}" for keys, name in found if keys)
        parts = [f"{what} does not match the model its config describes ({counts} keys): check that the "
                 "weights and the config (variant, family) belong together. The keys:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if misshaped:
            parts.append(_listing("wrong shapes", sorted(misshaped)))
        raise CheckpointError("\n".join(parts))

    model.load_state_dict(native_sd, strict=True, assign=True)
    return model


def export(model: torch.nn.Module, rules: Iterable[Rule],
           shape_fix: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
           prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's weights under a layout's names (the reverse of `load_into`)."""
    rules = list(rules)
    out = {}
    for native, tensor in model.state_dict().items():
        layout = prefix + rename(native, rules)
        out[layout] = shape_fix(layout, tensor) if shape_fix else tensor
    return out
