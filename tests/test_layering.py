"""The package's layers: a module imports only from its own layer or lower ones, and no modules import each other in
a cycle. Every import counts, also those inside functions (they run the same code, only later).

The layers, lowest first (a name is a subpackage or a top-level module of `recurrent_depth`):

    0  config, runtime, kernels, depth_sampler, assets,  typed config, device policy, C++ kernels, depth samplers,
       progress                                          the bundled checkpoint, progress lines on stderr
    1  model                                             the network: layers, forward, init, checkpoint I/O
    2  data, tasks                                       tokenizers and corpora; procedural tasks (data reads tasks)
    3  inference                                         caches, exit criteria, generation, the fused decode
    4  hf                                                the transformers `PreTrainedModel` (generate routes to 3)
    5  training                                          builds an `hf` model and trains it
    6  evaluation, inspection                            sweeps and reports over trained models
    7  serving                                           the HTTP server over the inference engine
    8  recurrent_depth (the package's own __init__)      lazy re-exports of the names above
    9  cli, __main__                                     `rdepth <verb>`: thin wrappers over everything

Run: pytest tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "recurrent_depth"
LAYERS: list[set[str]] = [
    {"config", "runtime", "kernels", "depth_sampler", "assets", "progress"},
    {"model"},
    {"data", "tasks"},
    {"inference"},
    {"hf"},
    {"training"},
    {"evaluation", "inspection"},
    {"serving"},
    {""},  # the package's __init__
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is named by its __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("recurrent_depth", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module that `name` (a module, or a module's attribute) refers to; None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Package modules that `module` imports anywhere in its file (`from a import b` counts a.b when b is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {m for m in map(_resolve, names) if m is not None and m != module}
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS and to this file's docstring")


GRAPH = {m: imports_of(m) for m in MODULES}
# Import edges that still close a cycle, each with why it is left: the cycle test skips them, and
# `test_known_cycles_still_exist` fails once one is gone, so that it is taken off this list.


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_its_layer_or_below(module: str) -> None:
    upward = sorted(f"{d} (layer {layer_of(d)})" for d in GRAPH[module] if layer_of(d) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from above: {upward}"


def _cycle() -> list[str] | None:
    """One import cycle between modules, or None (depth-first search with a colour per module)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m], _ = 1, path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d]
            if d not in state and (found := visit(d)):
                return found
        state[m], _ = 2, path.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_function_level_and_from_imports() -> None:
    """The parser must catch what the old layout did: a lazy import inside a function and `from pkg import mod`."""
    assert "recurrent_depth.inference.generate" in GRAPH["recurrent_depth"]  # inside `generate()`
    assert "recurrent_depth.kernels" in GRAPH["recurrent_depth.model.layers"]  # `from recurrent_depth import kernels`
    assert layer_of("recurrent_depth.model.layers") < layer_of("recurrent_depth.inference.fused")
