"""Reading back what a checkpoint was trained on: `rdepth eval --task` starts from the trained difficulty."""

from __future__ import annotations

import json

import pytest

from recurrent_depth.evaluation.provenance import task_for_eval, trained_task
from recurrent_depth.tasks import parse_task_args


def _state(folder, data: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "config": {"data": data}}))


def test_trainer_state_then_bundle_then_nothing(tmp_path) -> None:
    assert trained_task(tmp_path) is None
    (tmp_path / "bundle.json").write_text(json.dumps({"task": "addition", "difficulty": {"digits": [2, 2]}}))
    found = trained_task(tmp_path)
    assert (found.name, found.difficulty, found.source.name) == ("addition", {"digits": [2, 2]}, "bundle.json")
    _state(tmp_path, {"kind": "task", "task": {"name": "tree_path", "difficulty": {"path": [2, 3]}}})
    assert trained_task(tmp_path).source.name == "trainer_state.json"  # the training config wins
    _state(tmp_path, {"kind": "text", "task": {"name": "tree_path"}})  # trained on text: the task section is unused
    assert trained_task(tmp_path).name == "addition"
    (tmp_path / "trainer_state.json").write_text("{oops")
    with pytest.raises(ValueError, match="trainer_state.json: not valid JSON"):
        trained_task(tmp_path)


def test_task_for_eval_notes_where_the_knobs_came_from(tmp_path) -> None:
    _state(tmp_path, {"kind": "task", "task": {"name": "variable_binding", "difficulty": {"hops": [0, 0]}}})
    task, note = task_for_eval("variable_binding", tmp_path)
    assert task.hops == (0, 0) and "difficulty as trained" in note and "trainer_state.json" in note
    task, note = task_for_eval("variable_binding", tmp_path, {"hops": [2, 2]})
    assert task.hops == (2, 2) and task.n_vars == (8, 12) and "overridden by --task-args" in note
    task, note = task_for_eval("addition", tmp_path)
    assert task.digits == (1, 3) and "trained on variable_binding" in note
    assert "records no training task" in task_for_eval("addition", tmp_path / "elsewhere")[1]


def test_parse_task_args() -> None:
    assert parse_task_args(['{"hops": [0, 2]}', "roots=3", "n_vars=[9, 9]", "hops=[1,1]"]) == \
        {"hops": [1, 1], "roots": 3, "n_vars": [9, 9]}
    for bad, match in (("hops", "KEY=VALUE"), ("=3", "KEY=VALUE"), ('{"a": ', "not a JSON object"),
                       ("[1, 2]", "KEY=VALUE"), ("hops=[1,", "does not parse")):
        with pytest.raises(ValueError, match=match):
            parse_task_args([bad])
