"""Reading and writing weight files and JSON configs.

Weights are read from .safetensors (preferred), PyTorch .bin, or original .ckpt files. Pickled
files are opened with `torch.load(weights_only=True)`, never full unpickling, so a checkpoint
cannot run code. Everything is written atomically: to a temporary name, then renamed.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def read_checkpoint(path: str | Path) -> dict:
    """A weight file's top-level dict, on the CPU, as stored (tensors keep their dtype).

    A .ckpt may hold more than tensors (`state_dict`, `global_step`...): those come back too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}). Only plain "
                         "tensor checkpoints load; convert others to .safetensors first.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, on the CPU, as stored (dtype unchanged)."""
    return {k: v for k, v in read_checkpoint(path).items() if isinstance(v, torch.Tensor)}


def find_weights(folder: str | Path, stems: tuple[str, ...], half: bool = False) -> Path:
    """The weight file of a diffusers/transformers component folder.

    stems: file names without suffix, e.g. ("diffusion_pytorch_model",) or ("model", "pytorch_model").
    half: prefer the half-precision copy, `NAME.fp16.safetensors` (diffusers' variant="fp16"), where
    there is one. safetensors is preferred over .bin.
    """
    folder = Path(folder)
    for precision in ([".fp16"] if half else []) + [""]:
        for suffix in (".safetensors", ".bin"):
            for stem in stems:
                p = folder / f"{stem}{precision}{suffix}"
                if p.is_file():
                    return p
    raise FileNotFoundError(f"no weights in {folder}: expected one of "
                            + ", ".join(f"{s}.safetensors" for s in stems) + " (or .bin)")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic(Path(path), write)


def write_checkpoint(path: str | Path, data: dict) -> None:
    """Save a dict of tensors (and plain values) with torch.save, loadable with weights_only=True."""
    _atomic(Path(path), lambda tmp: torch.save(data, str(tmp)))


def write_state_dict(path: str | Path, sd: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Save tensors as .safetensors (contiguous, no shared storage, as the format requires)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    _atomic(Path(path), lambda tmp: save_file(sd, str(tmp), metadata=metadata or {"format": "pt"}))
