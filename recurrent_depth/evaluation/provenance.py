"""What a checkpoint was trained on, read back for evaluation: the built-in task and its difficulty knobs.

    found = trained_task("runs/vb/checkpoints/step_00001000")   # TrainedTask(name, difficulty, source) or None
    task, note = task_for_eval("variable_binding", "runs/vb/...", {"hops": [0, 2]})

A checkpoint written by `rdepth train` holds its training config in `trainer_state.json` (`config.data.task`); a
folder made by `rdepth bundle` names its task in `bundle.json`. Evaluating a task at default knobs when the model was
trained at others measures the wrong thing silently, so `rdepth eval --task` starts from the trained knobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainedTask:
    """name: the task family; difficulty: its knobs as trained; source: the file they were read from."""

    name: str
    difficulty: dict[str, Any]
    source: Path


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    return data if isinstance(data, dict) else None


def trained_task(model_dir: str | Path) -> TrainedTask | None:
    """The built-in task a checkpoint folder was trained on, from trainer_state.json or bundle.json; None if the
    folder records none (trained on text or JSONL data, or made elsewhere)."""
    folder = Path(model_dir)
    state = _read_json(folder / "trainer_state.json") or {}
    data = (state.get("config") or {}).get("data") or {}
    section = data.get("task") or {}
    if data.get("kind") == "task" and section.get("name"):
        return TrainedTask(section["name"], dict(section.get("difficulty") or {}), folder / "trainer_state.json")
    bundle = _read_json(folder / "bundle.json") or {}
    if bundle.get("task"):
        return TrainedTask(bundle["task"], dict(bundle.get("difficulty") or {}), folder / "bundle.json")
    return None


def task_for_eval(name: str, model_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Task `name` at the knobs the checkpoint was trained on (when it was trained on `name`), with `overrides`
    on top; returns (task, a one-line note saying where the knobs came from)."""
    from recurrent_depth.tasks import get_task

    found = trained_task(model_dir)
    knobs: dict[str, Any] = {}
    if found is not None and found.name == name:
        knobs.update(found.difficulty)
        note = f"task {name}: difficulty as trained, read from {found.source}"
    elif found is not None:
        note = f"task {name}: default difficulty (the checkpoint was trained on {found.name}, per {found.source})"
    else:
        note = f"task {name}: default difficulty (the checkpoint records no training task)"
    if overrides:
        knobs.update(overrides)
        note += f"; overridden by --task-args {json.dumps(overrides)}"
    return get_task(name, **knobs), note
