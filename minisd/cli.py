"""What every script checks before it starts work: numbers, devices and output paths.

A bad flag should cost the user one line and a second, not a traceback after ten minutes of sampling. So the
scripts parse numbers with the argparse types below (argparse turns their ValueError into a usage error with
exit code 2) and check devices and output paths before they load a model. `float("nan")` and `float("inf")`
parse without complaint, and a NaN compares false with every bound, so `--guidance nan` would pass a `< 0`
check and act as guidance off: every float flag goes through `finite_float`.
"""

import argparse
import contextlib
import errno
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from minisd.images import IMAGE_SUFFIXES


class UsageError(ValueError):
    """A bad input the user can fix: the script prints its one-line message and exits with code 2."""


# what loading a user's inputs raises when they are wrong: a missing or unreadable path, a broken config or
# weight file, a refused pickle (minisd's CheckpointError is a ValueError), an unreachable hub
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)


@contextlib.contextmanager
def bad_input_exits(program: str):
    """Around a script's checks and loading: a BAD_INPUT error becomes one line `PROGRAM: error: ...` (the
    message's first line; the rest, such as a list of keys, follows it) and exit code 2, not a traceback."""
    try:
        yield
    except BAD_INPUT as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def write_error(e: OSError, where) -> str:
    """What a failed write (a full disk, a folder made read-only) says: what failed, where, and what to do."""
    fix = "; free some space there" if e.errno == errno.ENOSPC else ""
    return f"could not write {e.filename or where}: {e.strerror or e}{fix}"


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 0")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number in [0, 1]")
    return value


def check_device(name: str) -> torch.device:
    """`name` as a torch.device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def check_writable_folder(folder: Path, flag: str = "--out") -> None:
    """Create `folder` (and its parents) and check that files can be written in it, before any work is
    done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create the folder ({e.strerror}); choose another "
                         f"{flag}") from None
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    try:  # a real write: permission bits say nothing to root, nor about a read-only file system
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write in the folder ({e.strerror}); choose another "
                         f"{flag}") from None


def check_image_path(path: Path, flag: str = "--out") -> None:
    """An image file to write with its settings: a known suffix, in a folder where files can be written."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{flag} {path}: cannot write {path.suffix or 'a file without a suffix'} with the "
                         f"settings in it; use one of {', '.join(IMAGE_SUFFIXES)}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give an image file name, e.g. {path / 'sample.png'}")
    check_writable_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and is not writable; choose another {flag}")
