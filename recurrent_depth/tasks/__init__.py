"""Procedural reasoning tasks with a difficulty knob, exact scoring and seeded local generation.

    from recurrent_depth.tasks import get_task, TASKS
    task = get_task("variable_binding", hops=(1, 4))
    rows = task.generate(1000, split="train", seed=0)        # list of {"prompt", "answer", "level"}
    cot = task.generate(10, split="test", seed=0, cot=True)  # answers "<steps>#<final>"
    task.score(task.extract_answer(model_output), rows[0]["answer"])
    task.alphabet                                             # every character prompts and answers use

Splits: `train` and `test` share the in-distribution knobs and never share a prompt; `ood` uses the harder knobs
(more digits, hops, nodes, operations). Each row also carries `level`, the instance's difficulty (hops, digits...).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from recurrent_depth.tasks.base import COT_SEP, SPLITS, Instance, Task, in_held_out
from recurrent_depth.tasks.families import (
    Addition,
    BindingChain,
    Cups,
    EdgeChase,
    ModularChain,
    PointerChase,
    TreePath,
    VariableBinding,
)

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Addition, VariableBinding, PointerChase, TreePath,
                                                          ModularChain, Cups, BindingChain, EdgeChase)}


def get_task(name: str, **difficulty: Any) -> Task:
    """Build task family `name` with difficulty knobs overridden by keyword (see each class for its knobs)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    knobs = [f.name for f in fields(cls)]
    unknown = sorted(set(difficulty) - set(knobs))
    if unknown:
        raise ValueError(f"task {name!r} has no difficulty knob {unknown}; its knobs are {knobs}")
    return cls(**difficulty)


def parse_task_args(items: list[str]) -> dict[str, Any]:
    """Difficulty knobs from command-line strings: each a JSON object (`{"hops": [0, 2]}`) or `KEY=VALUE` with a
    YAML value (`hops=[0,2]`, `roots=4`); later items win. Raises ValueError naming the item that does not parse."""
    import yaml

    knobs: dict[str, Any] = {}
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--task-args {item!r} is not a JSON object ({err.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"--task-args {item!r} is not a JSON object")
            knobs.update(value)
            continue
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-args {item!r}: expected KEY=VALUE (e.g. hops=[0,2]) or a JSON object")
        try:
            knobs[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"--task-args {item!r}: the value {raw!r} does not parse") from None
    return knobs


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (the format `rdepth eval --data` and `rdepth train` read); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def combined_alphabet(names: list[str] | None = None) -> str:
    """The union of the alphabets of tasks `names` (all tasks if None), for one char tokenizer over several tasks."""
    chosen = names if names is not None else list(TASKS)
    return "".join(sorted(set("".join(get_task(n).alphabet for n in chosen))))


__all__ = ["COT_SEP", "SPLITS", "TASKS", "Instance", "Task", "combined_alphabet", "get_task", "in_held_out",
           "parse_task_args", "write_jsonl"]
