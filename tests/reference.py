"""Helpers shared by the parity tests: random reference weights, hub-layout folders, comparison."""

import gzip
import importlib.util
import json
from pathlib import Path

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every 1-d parameter (norm weights and biases, all biases) away from its initial value.

    Freshly initialised norms are exactly 1 and biases often exactly 0: a loader that dropped them
    would still match. After this, every tensor carries information.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, relative to the output's scale (max |a|, at least 1)."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1.0)).item()


def hub_folder(folder: Path, pad: str) -> Path:
    """A tokenizer/ folder as the SD hub repos have it, from open-clip's merge list."""
    path = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:48895]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = {"content": "<|startoftext|>", **token}, {"content": "<|endoftext|>", **token}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": eos}))
    added = {"__type": "AddedToken"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": {**added, **bos}, "do_lower_case": True, "eos_token": {**added, **eos},
        "errors": "replace", "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad, "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer", "unk_token": {**added, **eos}}))
    return folder
