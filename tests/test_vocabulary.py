"""One vocabulary across the package, frozen by reading its source:

- a recurrence count is called `num_steps` (a list of them too; its cap `max_num_steps`), never n_steps, max_steps,
  depth(s), steps, r or cap, in any function's parameters or any dataclass's fields;
- one map from dtype names to torch dtypes (`runtime.DTYPES`), used by every flag, config and loader;
- exit criterion names come from their registry (`inference.exit.EXIT_CRITERIA`), depth sampler names from theirs
  (`depth_sampler.SAMPLERS`): no other module spells two of them in a list, tuple, set, dict or Literal, and every
  docstring, comment or README paragraph that lists the exit criteria lists all of them.

Also: no two modules define the same public function or class name (one name, one policy).

Each exception is listed below with its reason; `test_every_exception_is_still_needed` fails once one is gone, so
that it is taken off the list.

Run: pytest tests/test_vocabulary.py
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from recurrent_depth.depth_sampler import SAMPLERS
from recurrent_depth.inference.exit import ADAPTIVE_CRITERIA, EXIT_CRITERIA

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "recurrent_depth"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Names that mean "how many recurrences" somewhere in the old code (the list, and what was found here).
OLD_NAMES = {"n_steps", "max_steps", "depth", "depths", "steps", "r", "cap", "default_steps", "max_depth",
             "n_recurrence", "num_recurrence", "num_recurrences", "recurrences"}
# "file:function-or-class:name" -> why the name is not a recurrence count, or why it stays for now.
NAME_EXCEPTIONS = {
    "inference/cache.py:RowKVCache._resize:cap": "a page capacity, not a recurrence count",
    "inference/cache.py:RowKVCache.bind:steps": "each bound row's recurrence index (owned by the inference rewrite)",
    "inference/rows.py:RowEngine._context:steps": "each row's recurrence index (owned by the inference rewrite)",
    "inference/speculative.py:run:steps": "the draft's or the verifier's num_steps (owned by the inference rewrite)",
    "serving/engine.py:BatchEngine._release:steps": "recurrences a finished row spent (owned by the inference rewrite)",
    "serving/protocol.py:usage:steps": "recurrences spent, reported as usage.recurrence_steps",
    "cli/generate.py:_colour:steps": "the recurrences one token used",
    "cli/generate.py:_Printer.put_steps:steps": "the recurrences each streamed token used",
    "cli/generate.py:_report:steps": "the recurrences each token used",
    "cli/chat.py:_summary:steps": "the recurrences each token used",
    "training/config.py:DepthSection:depth": "the config key depth.depth (experiments/reproduce.py writes it)",
    "training/config.py:EvalSection:depths": "the config key eval.depths (configs/*.yaml, experiments/reproduce.py)",
}
# Dict displays that map names to torch dtypes, other than runtime.DTYPES.
DTYPE_MAP_EXCEPTIONS = {"model/weights.py": "safetensors' header codes (F32, BF16, ...), a file format, not a flag"}
REGISTRIES = {"inference/exit.py": set(EXIT_CRITERIA), "depth_sampler.py": set(SAMPLERS)}  # owner -> its names
NAME_LIST_EXCEPTIONS: dict[str, str] = {}  # "file:line" -> why a second spelling of a registry is needed there


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _scopes(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and class, methods named Class.method."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}." if isinstance(child, ast.ClassDef) else "")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


COUNT_TYPES = {"int", "list[int]", "tuple[int, ...]", "Sequence[int]", "int | None"}


def _names_in(scope: ast.AST) -> list[str]:
    """A function's parameters, or a class's fields annotated as counts (a field called `steps` is the established
    name of other things: training steps, `GenerateOutput.steps` per token, so fields are checked without it)."""
    if isinstance(scope, ast.ClassDef):
        return [s.target.id for s in scope.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                and ast.unparse(s.annotation) in COUNT_TYPES and s.target.id != "steps"]
    a = scope.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def old_recurrence_names() -> set[str]:
    found = set()
    for path in SOURCES:
        for qual, scope in _scopes(ast.parse(path.read_text())):
            found |= {f"{_rel(path)}:{qual}:{n}" for n in _names_in(scope) if n in OLD_NAMES}
    return found


def test_recurrence_counts_are_called_num_steps() -> None:
    new = sorted(old_recurrence_names() - set(NAME_EXCEPTIONS))
    assert not new, f"call a recurrence count num_steps (a cap: max_num_steps), not: {new}"


def _is_torch_dtype(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
            and node.attr in {"float32", "float", "bfloat16", "float16", "half", "float64", "double"})


def dtype_maps() -> set[str]:
    """Files (other than runtime.py) holding a dict display with two or more torch dtypes among its values."""
    found = set()
    for path in SOURCES:
        if path.name == "runtime.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and sum(map(_is_torch_dtype, node.values)) >= 2:
                found.add(_rel(path))
    return found


def test_one_dtype_map() -> None:
    new = sorted(dtype_maps() - set(DTYPE_MAP_EXCEPTIONS))
    assert not new, f"a second name -> torch dtype map in {new}: use recurrent_depth.runtime.DTYPES / resolve_dtype"


def registry_name_literals() -> set[str]:
    """'file:line' of every list, tuple, set, dict or Literal[...] outside a registry's own module that spells two or
    more of its names as string constants."""
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List | ast.Tuple | ast.Set):
                items = node.elts
            elif isinstance(node, ast.Dict):
                items = [k for k in node.keys if k is not None]
            else:
                continue
            constants = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if any(len(constants & names) >= 2 for owner, names in REGISTRIES.items() if owner != _rel(path)):
                found.add(f"{_rel(path)}:{node.lineno}")
    return found


def test_registry_names_are_not_spelled_out_in_code() -> None:
    new = sorted(registry_name_literals() - set(NAME_LIST_EXCEPTIONS))
    assert not new, (f"exit criterion or depth sampler names spelled out at {new}: read "
                     "inference.exit.EXIT_CRITERIA / depth_sampler.SAMPLERS (or SamplerName) instead")


def _mentioned(text: str) -> set[str]:
    """Adaptive criteria named in `text` as whole words (`kl` not inside `minp-kl`); `none` is an English word too,
    so it is not counted."""
    return {n for n in ADAPTIVE_CRITERIA if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)}


def _paragraphs() -> Iterator[tuple[str, str]]:
    """('file:line', paragraph) for every blank-line-separated paragraph of the package's files and README.md."""
    for path in [*SOURCES, REPO / "README.md"]:
        lines = path.read_text().splitlines()
        start = 0
        for i, line in enumerate([*lines, ""]):
            if not line.strip().strip('#"'):
                if i > start:
                    yield f"{path.relative_to(REPO)}:{start + 1}", "\n".join(lines[start:i])
                start = i + 1


def partial_exit_lists() -> dict[str, list[str]]:
    """Paragraphs that name three or more criteria but not all of them -> the ones they leave out."""
    out = {}
    for where, text in _paragraphs():
        named = _mentioned(text)
        if len(named) >= 3 and named != set(ADAPTIVE_CRITERIA):
            out[where] = sorted(set(ADAPTIVE_CRITERIA) - named)
    return out


def test_listed_exit_criteria_are_the_registry() -> None:
    partial = partial_exit_lists()
    assert not partial, f"a list of exit criteria that misses some (location -> missing): {partial}"


def test_every_exception_is_still_needed() -> None:
    assert set(NAME_EXCEPTIONS) <= old_recurrence_names(), set(NAME_EXCEPTIONS) - old_recurrence_names()
    assert set(DTYPE_MAP_EXCEPTIONS) <= dtype_maps()
    assert set(NAME_LIST_EXCEPTIONS) <= registry_name_literals()


@pytest.mark.parametrize(("source", "finds"), [
    ("def f(x, n_steps: int) -> None: ...", old_recurrence_names),
    ("import torch\nM = {'a': torch.float32, 'b': torch.bfloat16}", dtype_maps),
    ("CHOICES = ('kl', 'cosine')", registry_name_literals),
    ("from typing import Literal\nS = Literal['fixed', 'non-recurrent']", registry_name_literals),
])
def test_the_checks_see_what_they_look_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                           finds) -> None:
    """Each scan, run over one planted file, reports it (the scans above are not vacuous)."""
    planted = tmp_path / "recurrent_depth" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", planted.parent)
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", [planted])
    assert finds(), source


def test_the_paragraph_check_sees_a_partial_list() -> None:
    assert _mentioned("criteria: kl, minp-kl, cosine") == {"kl", "minp-kl", "cosine"}
    assert _mentioned("the minp-kl criterion") == {"minp-kl"}


VERB_PROTOCOL = {"add_parser", "run"}  # every cli/<verb>.py defines both (cli/main.py calls them by name)


def public_names_defined_twice() -> dict[str, list[str]]:
    """Public top-level functions and classes defined in two modules, other than the verb protocol and the lazy
    re-exports of package __init__ files (a function there that only imports and calls the real one)."""
    where: dict[str, list[str]] = {}
    for path in SOURCES:
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(_rel(path))
    return {name: files for name, files in where.items() if len(files) > 1 and name not in VERB_PROTOCOL}


def test_one_public_name_one_definition() -> None:
    """Two functions with one name (model.checkpoint.resolve_dtype beside runtime.resolve_dtype, whose "auto" meant
    different things) read as one policy where there are two."""
    assert not public_names_defined_twice()
