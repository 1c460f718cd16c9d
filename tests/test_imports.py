"""minisd's dependencies flow one way: models <- checkpoints <- pipeline/schedulers <- training,
evaluation, metrics, data <- toy, bench <- the scripts. Checked on the source (ast) with every import
counted, those inside functions too: a lazy import is a dependency all the same. And minisd runs without
the reference libraries (diffusers, transformers, ...): of its modules, only the benchmarks' reference
side, minisd/bench/reference.py, imports them."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("sample.py", "train.py", "evaluate.py", "train_vae.py", "dreambooth.py", "train_lcm.py")
# Each part of minisd (a top-level module or a subpackage) in its layer, lowest first: a part imports
# only from its own layer and the layers below. "minisd" is the package's __init__.
LAYERS = (
    # models (and their LoRA layers), grid, checks
    {"blocks", "unet", "vae", "vae_tiny", "clip", "clip_vision", "tokenizer", "table", "images", "cli",
     "lora"},
    {"checkpoints"},                                                            # key layouts, files
    {"pipeline", "schedulers", "convert", "minisd",                             # sampling
     "export", "numpy_samplers", "onnx_runner"},                                # ONNX export, torch-free runner
    {"training", "distill", "kd_step", "data", "latent_cache", "evaluation", "metrics", "flops",  # users
     "dreambooth", "dreambooth_data", "dreambooth_eval", "lcd_step", "export_bench"},
    {"toy", "bench"},                                                           # leaf consumers
)
REFERENCE_LIBRARIES = ("accelerate", "diffusers", "open_clip", "peft", "transformers")
REFERENCE_SIDE = "minisd.bench.reference"  # the one module that may import them; it says it needs them


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted((ROOT / "minisd").rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, anywhere in the file. For `from a.b import c`: a.b.c if that is a
    module of minisd (a submodule imported by name), else a.b."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from this package, or level - 1 packages up
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return names


def minisd_graph() -> dict[str, set[str]]:
    """Module -> the modules of minisd it imports (a dotted name cut to the longest module it names)."""
    graph = {}
    for name, path in MODULES.items():
        graph[name] = set()
        for imported in imported_names(path):
            parts = imported.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            target = next((p for p in prefixes if p in MODULES), None)
            if target and target != name:
                graph[name].add(target)
    return graph


def part(module: str) -> str:
    """minisd.checkpoints.ldm -> checkpoints, minisd.unet -> unet, minisd -> minisd."""
    return module.split(".")[1] if "." in module else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None. Depth first: a node met again while it is
    still on the current path closes a cycle."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_graph_sees_every_kind_of_import():
    graph = minisd_graph()
    assert "minisd.pipeline" in graph["minisd"]  # inside a function (__getattr__)
    assert "minisd.checkpoints.diffusers" in graph["minisd.pipeline"]  # from package import module as name
    assert "minisd.table" in graph["minisd.unet"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(minisd_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_two_parts_import_each_other():
    parts = {}
    for module, targets in minisd_graph().items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    cycle = find_cycle(parts)
    assert cycle is None, "parts that import each other: " + " -> ".join(cycle)


def test_only_toy_and_bench_import_toy_and_bench():
    wrong = [f"{module} imports {target}" for module, targets in minisd_graph().items() for target in targets
             if part(target) in ("toy", "bench") and part(module) not in ("toy", "bench")]
    assert not wrong, "the library never imports its leaf consumers: " + "; ".join(wrong)


def test_layers_point_down():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    unplaced = sorted({part(m) for m in MODULES} - layer.keys())
    assert not unplaced, f"put {unplaced} in a layer of LAYERS"
    upward = [f"{module} (layer {layer[part(module)]}) imports {target} (layer {layer[part(target)]})"
              for module, targets in minisd_graph().items() for target in targets
              if layer[part(target)] > layer[part(module)]]
    assert not upward, "; ".join(upward)


@pytest.mark.parametrize("path", [*MODULES.values(), *(ROOT / s for s in SCRIPTS)], ids=[*MODULES, *SCRIPTS])
def test_reference_libraries_stay_out(path):
    if module_name(path) == REFERENCE_SIDE:
        return
    found = sorted({n.split(".")[0] for n in imported_names(path)} & set(REFERENCE_LIBRARIES))
    assert not found, (f"{path.relative_to(ROOT)} imports {found}, test-only libraries "
                       f"(only {REFERENCE_SIDE} may)")


CHECK_IMPORTS = """
import importlib, sys
for name in {blocked}:
    sys.modules[name] = None  # `import name` now raises ImportError
for module in {modules}:
    importlib.import_module(module)
"""


def test_everything_imports_without_reference_libraries():
    """Every module of minisd but the reference side, and every script, imports with them blocked."""
    modules = [m for m in MODULES if m != REFERENCE_SIDE] + [s.removesuffix(".py") for s in SCRIPTS]
    code = CHECK_IMPORTS.format(blocked=list(REFERENCE_LIBRARIES), modules=modules)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
