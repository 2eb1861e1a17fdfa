"""Progress on stderr, the one helper of the CLI verbs and the training loop: live in a terminal, quiet for a short
piped run, the latest status now and then for a long one (even while one stage runs long), a line that stays when
asked (training's last step), nothing when disabled."""

from __future__ import annotations

import io
import threading
import time

from recurrent_depth.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_short_piped_run_writes_nothing() -> None:
    stream = io.StringIO()
    with Progress(stream, after_s=5.0) as progress:
        progress.update("loading")
        progress.update("token 1/9")
    assert stream.getvalue() == ""


def test_a_long_piped_stage_is_reported_while_it_runs() -> None:
    stream = io.StringIO()
    with Progress(stream, after_s=0.05, every_s=0.05) as progress:
        progress.update("tracing 64 steps")
        deadline = time.monotonic() + 10
        while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the stage is under way; no further update comes
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.endswith("] tracing 64 steps") and line.startswith("[") for line in lines)
    after = stream.getvalue()
    time.sleep(0.15)
    assert stream.getvalue() == after  # nothing more once done


def test_a_terminal_gets_one_line_rewritten_and_cleared() -> None:
    clock = iter([100.0, 100.0, 101.0]).__next__
    stream = _Terminal()
    progress = Progress(stream, clock=clock)
    progress.update("loading the checkpoint")
    progress.update("token 1/2")
    progress.done()
    text = stream.getvalue()
    assert "\n" not in text and text.startswith("\r[  0.0 s] loading the checkpoint")
    assert "\r[  1.0 s] token 1/2" in text and text.endswith("\r")


def test_piped_updates_write_a_line_when_one_is_due_and_kept_lines_at_once() -> None:
    """Training's use: the first step at once (after_s=0), then at most one line per every_s, and the last step."""
    now = [0.0]
    stream = io.StringIO()
    with Progress(stream, after_s=0.0, every_s=30.0, clock=lambda: now[0]) as progress:
        for step in range(1, 6):
            now[0] = 10.0 * step
            progress.update(f"train step {step}/5", keep=step == 5)
    assert stream.getvalue().splitlines() == ["[ 10.0 s] train step 1/5", "[ 40.0 s] train step 4/5",
                                              "[ 50.0 s] train step 5/5"]


def test_a_kept_line_stays_on_a_terminal() -> None:
    stream = _Terminal()
    with Progress(stream, clock=lambda: 0.0) as progress:
        progress.update("train step 1/2 loss=2.0000")
        progress.update("train step 2/2", keep=True)
    text = stream.getvalue()
    assert text.endswith("\r[  0.0 s] train step 2/2" + " " * len(" loss=2.0000") + "\n")  # padded over the longer line


def test_a_disabled_progress_writes_nothing_and_starts_no_thread() -> None:
    threads = threading.active_count()
    for stream in (io.StringIO(), _Terminal()):
        with Progress(stream, after_s=0.0, every_s=0.0, enabled=False) as progress:
            assert threading.active_count() == threads
            progress.update("train step 1/1", keep=True)
        assert stream.getvalue() == ""


def test_a_live_line_is_cut_to_the_terminal_width(monkeypatch) -> None:
    """A line longer than the terminal wraps, and the carriage return would then rewrite only its last row."""
    monkeypatch.setenv("COLUMNS", "30")
    stream = _Terminal()
    with Progress(stream, clock=lambda: 0.0) as progress:
        progress.update("train step 1/100 loss=2.3456 tok_s=1,234 depth=3+2")
    assert stream.getvalue().startswith("\r[  0.0 s] train step 1/100 lo\r")  # 29 characters, then cleared
