"""Reading and writing weight files and JSON configs.

Weights are read from .safetensors (preferred), PyTorch .bin, or original .ckpt files. Pickled
files are opened with `torch.load(weights_only=True)`, never full unpickling, so a checkpoint
cannot run code. Everything is written atomically: to a temporary name, then renamed.
"""

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
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
            raise ValueError(f"cannot read {path} as safetensors ({type(e).__name__}: {first_sentence(e)}): "
                             "the file is truncated or not a safetensors file; get or save it "
                             "again.") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a Python object: loading it could run code
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {found[1]}" if found else "not only tensors"
        raise ValueError(f"{path}: refused to unpickle it: it holds Python objects ({what}); "
                         "minisd loads pickled checkpoints with torch.load(weights_only=True), which never "
                         "runs their code. If you trust the file, re-save its tensors as "
                         ".safetensors.") from None
    except Exception as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{first_sentence(e)}): the file is truncated or not a checkpoint.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def first_sentence(error: Exception) -> str:
    """The start of a library's error message, for a one-line error of our own."""
    return str(error).strip().split("\n")[0].split(". ")[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, on the CPU, as stored (dtype unchanged)."""
    return {k: v for k, v in read_checkpoint(path).items() if isinstance(v, torch.Tensor)}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file's header (what `save_file(..., metadata=)` stored); {} for
    other files, which have none."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read {path} as safetensors ({type(e).__name__}: {first_sentence(e)}): "
                         "the file is truncated or not a safetensors file; get or save it again.") from None


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
    """A JSON config (a dict); a missing, truncated or binary file is an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file, so not a JSON config; download or save it "
                         "again") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file "
                         "is truncated or corrupt; download or save it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object a config is")
    return data


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
