"""minisd as an installed package: the wheel that pyproject.toml builds holds the whole library and the
tokenizer's vocabulary, and its dependencies are the requirements files."""

import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from minisd import tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"


def requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_tokenizer_finds_its_vocabulary_in_the_package():
    shipped = importlib.resources.files("minisd") / VOCABULARY
    assert shipped.is_file()
    assert Path(str(shipped)).resolve() == tokenizer.BPE_FILE.resolve()


def test_wheel_holds_the_library_and_its_vocabulary(tmp_path):
    # build from a copy, so that setuptools' build/ and *.egg-info do not land in the repository;
    # --no-index --no-build-isolation: setuptools comes from the test environment, and no network is needed
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "requirements.txt", "requirements-test.txt", "requirements-export.txt",
                 "README.md"]:
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "minisd", source / "minisd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
    subprocess.run(pip + ["-w", str(tmp_path / "dist"), str(source)], check=True)

    (wheel,) = (tmp_path / "dist").glob("minisd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    requires = [line.removeprefix("Requires-Dist: ") for line in lines if line.startswith("Requires-Dist: ")]
    library = {p.relative_to(ROOT).as_posix() for p in (ROOT / "minisd").rglob("*.py")}
    assert library <= names
    assert f"minisd/{VOCABULARY}" in names
    assert {n.split("/")[0] for n in names} == {"minisd", metadata.split("/")[0]}  # no tests, no scripts
    extras = {f'{r}; extra == "{extra}"' for extra in ("test", "export")
              for r in requirements(f"requirements-{extra}.txt")}
    assert requires[:len(requirements("requirements.txt"))] == requirements("requirements.txt")
    assert set(requires[len(requirements("requirements.txt")):]) == extras
