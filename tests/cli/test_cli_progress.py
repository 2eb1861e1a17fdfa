"""Progress on stderr: live in a terminal, quiet for a short piped run, the latest status now and then for a long
one (even while one stage runs long)."""

from __future__ import annotations

import io
import time

from recurrent_depth.cli.progress import Progress


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
