"""The wheels the GPU check needs beyond torch, for a machine that has torch alone and no network.

    python -m minisd.bench gpu-wheels            # here, with PyPI: writes .whl/gpu-wheels.tar.xz
    python -m minisd.bench gpu-check --out DIR   # there: installs them (install() below), then measures

What the check imports beyond torch: minisd's run-time requirements (requirements.txt, less scipy, which only
FID and the toy checker use) and the reference side's diffusers and transformers, pinned as the tests pin them
(requirements-test.txt), with all that these require, for the GPU machine's Python on x86-64 Linux. pip
resolves them at the versions this environment runs wherever it has them, so the machine gets the tested set.
Left out: what every torch install brings (TORCH_BRINGS) and what only a command-line entry point reaches
(PRUNED; the check runs none).

The wheels travel as one tar, each re-zipped uncompressed and the whole compressed with xz: about half the
size of the wheels as PyPI ships them (each file deflated on its own), which counts, as the repository and the
wheels go to the GPU machine together in 64 MiB. Standard library only: this module runs before the wheels
are installed.
"""

import argparse
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: requirements*.txt and .whl/
PACK = ROOT / ".whl" / "gpu-wheels.tar.xz"
MANIFEST = "gpu-wheels.json"  # beside the pack: the wheels, their sizes and the Python they are for
REFERENCE = ("diffusers", "transformers")  # the reference side's libraries, from requirements-test.txt
NOT_NEEDED = {"torch", "scipy"}  # torch: the machine's own; scipy: FID and the toy checker, not the check
# What any torch install brings: its requirements on Linux (torch's METADATA; the CUDA libraries and Triton
# aside, which nothing here requires), with sympy's mpmath and jinja2's markupsafe
TORCH_BRINGS = {"filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx", "jinja2",
                "markupsafe", "fsspec"}
# Reached only through command lines the check never runs: transformers' (typer, and with it pydantic, rich
# and more) and huggingface_hub's (click), and the hub's Xet download backend (no downloads offline).
PRUNED = {"typer", "click", "hf-xet"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares them: Pillow, pillow and PIL-low alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    """'huggingface-hub<3.0,>=1.32.0; python_version < "3.11"' -> 'huggingface-hub'."""
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1))


def roots() -> list[str]:
    """The requirements the check starts from: requirements.txt's, and the pinned reference libraries."""
    runtime = [line for line in requirement_lines("requirements.txt")
               if requirement_name(line) not in NOT_NEEDED]
    return runtime + [line for line in requirement_lines("requirements-test.txt")
                      if requirement_name(line) in REFERENCE]


def requirement_lines(name: str) -> list[str]:
    if not (ROOT / name).is_file():
        raise FileNotFoundError(f"no {ROOT / name}: gpu-wheels runs from a clone of the repository")
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [line for line in lines if line]


def wheel_requires(path: Path) -> list[str]:
    """The names a wheel requires (its METADATA's Requires-Dist), extras left out; markers are not read:
    a name the resolver did not download for this platform is simply absent from the set."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8").splitlines()
    return [requirement_name(line.split(":", 1)[1]) for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-")[0])


def needed(start: list[str], requires: dict[str, list[str]], skip: set[str]) -> list[str]:
    """The names reachable from `start` through `requires` (name -> names), never entering `skip`; names
    that `requires` does not hold (not downloaded) are dropped."""
    seen, todo = set(), [n for n in start if n not in skip]
    while todo:
        name = todo.pop()
        if name in seen or name not in requires:
            continue
        seen.add(name)
        todo += [n for n in requires[name] if n not in skip]
    return sorted(seen)


def uncompressed(path: Path) -> bytes:
    """The wheel re-zipped with every file stored: still a valid wheel (its RECORD hashes the files, not the
    zip), and text that xz then compresses across all the wheels at once."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    return out.getvalue()


def pack(wheels: list[Path], dest: Path, python: str) -> dict:
    """The wheels into one xz tar at dest, and the manifest beside it; returns the manifest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for path in sorted(wheels):
            data = uncompressed(path)
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(dest)
    manifest = dict(python=python, wheels={p.name: p.stat().st_size for p in sorted(wheels)},
                    wheels_bytes=sum(p.stat().st_size for p in wheels), pack_bytes=dest.stat().st_size)
    (dest.parent / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def download(dest: Path = PACK, python: str = "3.12") -> dict:
    """pip download of roots() for CPython `python` on x86-64 Linux, the selection of what the check needs,
    packed at dest."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, pins = Path(tmp) / "wheels", Path(tmp) / "constraints.txt"
        # this environment's versions, where it has the package: the set the tests ran with
        installed = importlib.metadata.distributions()
        pins.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in installed
                                if d.metadata["Name"] and normalize(d.metadata["Name"]) not in NOT_NEEDED))
        abi = "cp" + python.replace(".", "")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                   "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                   "--abi", "none", *(a for p in PLATFORMS for a in ("--platform", p)),
                   "-c", str(pins), "-d", str(folder), *roots()]
        subprocess.run(command, check=True)
        wheels = {wheel_name(p): p for p in folder.glob("*.whl")}
        requires = {name: wheel_requires(path) for name, path in wheels.items()}
        keep = needed([requirement_name(r) for r in roots()], requires, TORCH_BRINGS | PRUNED)
        return pack([wheels[n] for n in keep], dest, python)


def install(pack_path: Path, target: Path, use_pip: bool | None = None) -> dict:
    """The pack's wheels installed into `target` (emptied first), offline and without resolving (the pack is
    the resolved set); `target` then goes first on PYTHONPATH. With pip (if it is there, unless use_pip says):
    `pip install --no-index --no-deps --target`; raises RuntimeError with its last lines when it fails.
    Without: each wheel unzipped (unpack())."""
    start = time.time()
    use_pip = importlib.util.find_spec("pip") is not None if use_pip is None else use_pip
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(pack_path) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4, 3.12: no paths outside tmp
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if use_pip:
            command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                       "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target",
                       str(target)]
            result = subprocess.run(command + [str(w) for w in wheels], capture_output=True, text=True)
            if result.returncode:
                lines = (result.stdout + result.stderr).splitlines()
                raise RuntimeError("pip install failed: " + " | ".join(lines[-5:]))
        else:
            for wheel in wheels:
                unpack(wheel, target)
    return dict(wheels=[w.name for w in wheels], seconds=round(time.time() - start, 1), target=str(target),
                by="pip" if use_pip else "unzip")


def unpack(wheel: Path, target: Path) -> None:
    """What pip does with a wheel, for a Python without pip: its files into `target`, and its .data folder's
    purelib and platlib files to the top (its scripts and headers are not needed here)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            top, _, rest = info.filename.partition("/")
            path = info.filename
            if top.endswith(".data"):
                kind, _, path = rest.partition("/")
                if kind not in ("purelib", "platlib"):
                    continue
            if not path or info.is_dir() or ".." in Path(path).parts:
                continue
            dest = target / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))


def pack_python(pack_path: Path) -> str | None:
    """The Python version the pack was made for (its manifest), or None without one."""
    manifest = pack_path.parent / MANIFEST
    return json.loads(manifest.read_text())["python"] if manifest.is_file() else None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m minisd.bench gpu-wheels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version (default 3.12)")
    p.add_argument("--out", type=Path, default=PACK, help=f"the pack (default {PACK.relative_to(ROOT)})")
    args = p.parse_args(argv)
    try:
        manifest = download(args.out, args.python)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"gpu-wheels: error: {e} (pip download needs PyPI; its messages are above)", file=sys.stderr)
        return 1
    for name, size in manifest["wheels"].items():
        print(f"{size / 2**20:7.2f} MiB  {name}")
    print(f"{len(manifest['wheels'])} wheels, {manifest['wheels_bytes'] / 2**20:.1f} MiB as shipped; the "
          f"pack {args.out}: {manifest['pack_bytes'] / 2**20:.1f} MiB")
    return 0
