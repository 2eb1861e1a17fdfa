"""Training progress: plain, complete lines when stderr is not a terminal (nohup, redirects), tqdm on one."""

from __future__ import annotations

import io

from recurrent_depth.training.progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(bar, steps: int) -> None:
    for step in range(steps):
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", depth="3+2")
        bar.update(1)
    bar.close()


def test_not_a_terminal_gives_one_plain_line_per_interval() -> None:
    stream = io.StringIO()
    _run(LineProgress(total=4, initial=1, stream=stream, interval_s=0.0), 3)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[0].startswith("train step 2/4 (50%) loss=1.0000 depth=3+2 elapsed=")
    assert lines[-1].startswith("train step 4/4 (100%) loss=0.3333")


def test_the_default_interval_prints_the_first_and_last_step_of_a_short_run() -> None:
    stream = io.StringIO()
    bar = progress(5, 0, enabled=True, stream=stream)
    assert isinstance(bar, LineProgress)
    _run(bar, 5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train step 1/5 (20%)") and lines[1].startswith("train step 5/5 (100%)")


def test_a_terminal_gets_tqdm_and_a_disabled_bar_prints_nothing() -> None:
    term = _Terminal()
    bar = progress(3, 0, enabled=True, stream=term)
    assert not isinstance(bar, LineProgress)
    _run(bar, 3)
    assert "\r" in term.getvalue()
    quiet = io.StringIO()
    _run(progress(3, 0, enabled=False, stream=quiet), 3)
    assert quiet.getvalue() == ""
