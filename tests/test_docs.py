"""The documentation holds together: every relative link in the Markdown files resolves (file and heading),
README.md stays a short map, and nothing in the repository cites a file that a clone does not have."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 16_000  # bytes: the README is a map; the details live in docs/
# Notes kept outside the repository, which a clone does not have (spelt in pieces so this file does not match)
OUTSIDE = re.compile(r"\b" + "shared" + r"/|\b" + "BKSDM" + r"\.md\b|\b" + "DESIGN" + r"\.md\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def tracked_files() -> list[Path]:
    """The files git tracks; without git (an unpacked archive), every file outside hidden and data folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {"weights", "data", "results", "__pycache__"}
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") or part in skip for part in p.relative_to(ROOT).parts[:-1])]


def markdown_files() -> list[Path]:
    return sorted(p for p in tracked_files() if p.suffix == ".md")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces -> -."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
            seen[base] = n + 1
    return found


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_docs_pages_are_reachable_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    pages = [p for p in markdown_files() if p.parent == ROOT / "docs"]
    unlinked = [str(p.relative_to(ROOT)) for p in pages if p not in linked]
    assert pages and not unlinked, f"docs pages that README.md does not link to: {', '.join(unlinked)}"


def test_readme_is_a_map():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, (f"README.md is {size:,} bytes; move details into docs/ "
                                 f"(limit {README_LIMIT:,})")


def test_nothing_cites_files_outside_the_repository():
    citing = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, weights
            continue
        citing += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                   if OUTSIDE.search(line)]
    assert not citing, f"cite notes that are not in the repository: {', '.join(citing)}"


def test_no_merge_conflict_is_left():
    """A merge's conflict markers left in a file (they passed unseen in a Markdown table once)."""
    marker = re.compile(r"^(<{7}|>{7})( |$)|^={7}$")
    left = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        left += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                 if marker.match(line)]
    assert not left, f"merge conflict markers at {', '.join(left)}"
