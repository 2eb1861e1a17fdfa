"""Records (JSON/CSV), plots, the offline corpus, and `rdepth eval` end to end."""

from __future__ import annotations

import csv
import json

import pytest

from recurrent_depth.cli.main import main
from recurrent_depth.evaluation.corpus import CORPUS_SPLITS, corpus_texts, export_corpus, load_corpus
from recurrent_depth.evaluation.plots import plot_depth_by_level, plot_depth_sweep, plot_exit_sweep
from recurrent_depth.evaluation.records import read_records, to_csv, write_records
from recurrent_depth.tasks import get_task

RECORDS = [{"num_steps": 1, "accuracy": 0.25, "accuracy_by_level": {1: 0.5, 2: 0.0}, "threshold": None,
            "mean_steps": 1.0},
           {"num_steps": 4, "accuracy": 0.75, "accuracy_by_level": {1: 1.0, 2: 0.5}, "threshold": 1e-3,
            "mean_steps": 3.5}]


def test_records_round_trip_and_flatten(tmp_path) -> None:
    paths = write_records(RECORDS, tmp_path / "o", "sweep", meta={"model": "m"})
    records, meta = read_records(paths["json"])
    assert meta == {"model": "m"} and [r["accuracy"] for r in records] == [0.25, 0.75]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[1]["accuracy_by_level.2"] == "0.5" and rows[0]["num_steps"] == "1"
    assert to_csv([{"a": [1, 2]}]).splitlines()[1] == '"[1, 2]"'
    with pytest.raises(ValueError, match="no records"):
        write_records([], tmp_path, "x")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="records"):
        read_records(tmp_path / "bad.json")


def test_plots_are_pngs(tmp_path) -> None:
    for path in (plot_depth_sweep({"a": RECORDS, "b": RECORDS}, tmp_path / "d.png"),
                 plot_exit_sweep(RECORDS, tmp_path / "e.png"),
                 plot_depth_by_level(RECORDS, tmp_path / "l.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="perplexity"):
        plot_depth_sweep(RECORDS, tmp_path / "p.png", metric="perplexity")
    with pytest.raises(ValueError, match="level"):
        plot_depth_by_level([{"num_steps": 1, "accuracy": 0.5}], tmp_path / "q.png")


def test_corpus_split_is_deterministic_and_disjoint(tmp_path) -> None:
    train, valid = load_corpus("train"), load_corpus("validation")
    assert train and valid and {d.name for d in train}.isdisjoint(d.name for d in valid)
    assert [d.name for d in load_corpus("validation")] == [d.name for d in valid]
    assert sum(len(d.text) for d in train) > 100_000  # the interpreter's reference-manual topics
    capped = corpus_texts("train", max_chars=5000)
    assert sum(map(len, capped)) == 5000
    paths = export_corpus(tmp_path / "c", max_chars=3000)
    assert set(paths) == set(CORPUS_SPLITS) and all(len(p.read_text()) > 0 for p in paths.values())
    assert paths["train"].parent != paths["validation"].parent
    with pytest.raises(ValueError, match="split"):
        load_corpus("dev")
    with pytest.raises(ValueError, match="sources"):
        load_corpus("train", sources=("web",))


def test_code_corpus_reads_the_standard_library() -> None:
    docs = load_corpus("validation", sources=("code",), max_chars=50_000)
    assert docs and all(d.name.startswith("code/") and d.name.endswith(".py") for d in docs)
    assert not any("/test/" in d.name or "/tests/" in d.name for d in docs)


def test_rdepth_eval_end_to_end(checkpoint, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    rows = get_task("variable_binding").generate(6, "test", seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(checkpoint), "--data", str(data), "--num-steps", "1,2,4", "--out", str(out),
               "--exit", "kl:0,1e-2", "--threads", "1", "--method", "teacher_forced", "--init-scale", "0",
               "--device", "cpu", "--dtype", "float32"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["num_steps"] for r in summary["depth_sweep"]] == [1, 2, 4]
    assert [r["threshold"] for r in summary["exit_sweep"]] == [None, 0.0, 0.01]
    assert summary["meta"]["depth_sweep_method"] == "teacher_forced"
    assert summary["depth_sweep"][2]["accuracy"] == summary["exit_sweep"][0]["accuracy"]  # r=4: both methods agree
    for stem in ("depth_sweep", "exit_sweep"):
        assert (out / f"{stem}.csv").is_file() and (out / f"{stem}.png").is_file()
    assert len(list(csv.DictReader((out / "depth_sweep.csv").open()))) == 3
    assert "accuracy against test-time depth" in capsys.readouterr().out


def test_rdepth_eval_task_and_corpus(checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(checkpoint), "--task", "addition", "--split", "ood", "--n", "5", "--cot",
               "--corpus", "docs", "--max-blocks", "2", "--seq-len", "32", "--num-steps", "0,2", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["task"] == "addition" and summary["meta"]["cot"] is True
    assert len(summary["perplexity_sweep"]) == 2
    assert (out / "depth_by_level.png").is_file() and len(summary["depth_sweep_by_level"]) == 2
    assert all(r["perplexity"] > 1 for r in summary["perplexity_sweep"])


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "missing.jsonl"], "not found"),
    (["--task", "addition", "--num-steps", "1,x"], "--num-steps"),
    (["--task", "addition", "--exit", "nope"], "--exit"),
    (["--task", "addition", "--exit", "kl:1e-2,x"], "--exit"),
    ([], "give --data"),
    (["--task", "nope"], "unknown task"),
])
def test_rdepth_eval_bad_input(checkpoint, tmp_path, capsys, args, message) -> None:
    rc = main(["eval", "--model", str(checkpoint), "--out", str(tmp_path), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_rdepth_eval_exit_name_alone_sweeps_the_default_thresholds(checkpoint, tmp_path) -> None:
    from recurrent_depth.cli.evaluate import SWEEP_THRESHOLDS

    out = tmp_path / "out"
    rc = main(["eval", "--model", str(checkpoint), "--task", "addition", "--n", "2", "--num-steps", "1,2",
               "--exit", "kl", "--max-num-steps", "3", "--max-new-tokens", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["threshold"] for r in summary["exit_sweep"]] == [None, *SWEEP_THRESHOLDS]
    meta = json.loads((out / "exit_sweep.json").read_text())["meta"]
    assert meta["max_num_steps"] == 3 and meta["criterion"] == "kl"
    assert main(["eval", "--model", str(checkpoint), "--task", "addition", "--n", "2", "--num-steps", "1",
                 "--exit", "none", "--threads", "1", "--out", str(out / "none")]) == 0
    assert "exit_sweep" not in json.loads((out / "none" / "summary.json").read_text())  # none: no sweep


def test_rdepth_eval_bad_jsonl(checkpoint, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    assert main(["eval", "--model", str(checkpoint), "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def _trained_on(checkpoint, tmp_path, task: dict) -> object:
    """A copy of the checkpoint folder whose trainer_state.json says it was trained on `task`."""
    import shutil

    folder = tmp_path / "trained"
    shutil.copytree(checkpoint, folder)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {"data": {"kind": "task",
                                                                                          "task": task}}}))
    return folder


def test_rdepth_eval_task_reads_trained_knobs_and_writes_predictions(checkpoint, tmp_path, capsys) -> None:
    folder = _trained_on(checkpoint, tmp_path, {"name": "variable_binding", "difficulty": {"hops": [0, 0]}})
    out = tmp_path / "out"
    args = ["eval", "--model", str(folder), "--task", "variable_binding", "--n", "6", "--num-steps", "1,2",
            "--method", "teacher_forced", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"difficulty as trained, read from {folder / 'trainer_state.json'}" in captured.err
    assert "r=2: 6/6 rows" in captured.err and "r=1: accuracy" in captured.err  # progress, on stderr
    assert "accuracy by difficulty level" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["difficulty"]["hops"] == [0, 0]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {x["num_steps"] for x in lines} == {1, 2} and {x["level"] for x in lines} == {0}
    assert set(lines[0]) == {"sweep", "num_steps", "threshold", "prompt", "answer", "prediction", "correct",
                             "level", "steps"}
    assert sum(x["correct"] for x in lines if x["num_steps"] == 2) == summary["depth_sweep"][1]["accuracy"] * 6
    assert all(x["correct"] == (x["prediction"] == x["answer"]) for x in lines)
    # --task-args on top of the trained knobs, as JSON or KEY=VALUE
    assert main([*args, "--task-args", '{"hops": [1, 2]}', "--task-args", "roots=3"]) == 0
    assert "overridden by --task-args" in capsys.readouterr().err
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["difficulty"]["hops"] == [1, 2] and meta["difficulty"]["roots"] == 3
    assert {json.loads(x)["level"] for x in (out / "predictions.jsonl").read_text().splitlines()} <= {1, 2}


def test_rdepth_eval_greedy_predictions_with_exit(checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    assert main(["eval", "--model", str(checkpoint), "--task", "modular_chain", "--n", "4", "--num-steps", "1,3",
                 "--exit", "kl:1e-2", "--out", str(out), "--init-scale", "0"]) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(x["sweep"], x["threshold"]) for x in lines[::4]] == [("depth", None), ("depth", None),
                                                                  ("exit", None), ("exit", 0.01)]
    assert all(x["steps"] and max(x["steps"]) <= 3 for x in lines if x["sweep"] == "exit")
    records = json.loads((out / "depth_sweep.json").read_text())["records"]
    assert "predictions" not in records[0] and "hits" not in records[0]  # they live in predictions.jsonl only


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "variable_binding", "--task-args", "hops"], "KEY=VALUE"),
    (["--task", "variable_binding", "--task-args", "{bad"], "not a JSON object"),
    (["--task", "variable_binding", "--task-args", "[1]"], "KEY=VALUE"),
    (["--task", "variable_binding", "--task-args", "depth=3"], "no difficulty knob ['depth']"),
    (["--task", "variable_binding", "--task-args", "hops=[1,9]"], "n_vars"),
    (["--data", "x.jsonl", "--task-args", "hops=1"], "give --task too"),
])
def test_rdepth_eval_bad_task_args(checkpoint, tmp_path, capsys, args, message) -> None:
    rc = main(["eval", "--model", str(checkpoint), "--out", str(tmp_path), *args])
    assert rc == 2 and message in capsys.readouterr().err
