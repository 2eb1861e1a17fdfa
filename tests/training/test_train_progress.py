"""The training loop's progress line: step, share done, the step's fields, and the time left at this run's pace."""

from __future__ import annotations

from recurrent_depth.training.loop import _status, train


def test_the_status_line_names_the_step_and_the_time_left() -> None:
    assert _status(40, 100, 0, 62.0, "loss=2.3456 depth=3+2") == (
        "train step 40/100 (40%) loss=2.3456 depth=3+2 eta=0:01:33")


def test_a_resumed_run_counts_its_pace_from_where_it_resumed() -> None:
    # 10 steps since resuming at step 90 took 20 s: 2 s a step, 0 steps left at the end, 10 left at step 90 + 0
    assert _status(100, 100, 90, 20.0, "loss=1.0").endswith("(100%) loss=1.0 eta=0:00:00")
    assert _status(95, 100, 90, 10.0, "loss=1.0").endswith("eta=0:00:10")


def test_a_piped_run_logs_its_first_and_last_step_on_stderr(tiny_config, tmp_path, capsys) -> None:
    train(tiny_config(train={"steps": 4}, log={"progress": True}), tmp_path / "run")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "train step" in line]
    assert "\r" not in err and len(lines) == 2, err
    assert "] train step 1/4 (25%) loss=" in lines[0] and " eta=" in lines[0]
    assert "] train step 4/4 (100%) loss=" in lines[1] and " depth=" in lines[1] and lines[1].endswith("eta=0:00:00")


def test_a_run_without_progress_writes_no_progress_line(tiny_config, tmp_path, capsys) -> None:
    train(tiny_config(train={"steps": 2}), tmp_path / "run")  # log.progress: false
    assert "train step" not in capsys.readouterr().err
