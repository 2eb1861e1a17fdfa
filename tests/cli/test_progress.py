"""Progress on stderr: live in a terminal, quiet for a short piped run, a line now and then for a long one."""

from __future__ import annotations

import io

from recurrent_depth.cli.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_piped_run_is_quiet_until_it_is_long_then_writes_a_line_now_and_then() -> None:
    clock, stream = _Clock(), io.StringIO()
    progress = Progress(stream, after_s=5.0, every_s=10.0, clock=clock)
    progress.update("loading")
    clock.now += 4.0
    progress.update("token 1/9")
    assert stream.getvalue() == ""
    clock.now += 2.0
    progress.update("token 2/9")
    clock.now += 3.0
    progress.update("token 3/9")  # 3 s after the last line: not yet
    clock.now += 8.0
    progress.update("token 4/9")
    assert stream.getvalue().splitlines() == ["[  6.0 s] token 2/9", "[ 17.0 s] token 4/9"]


def test_a_terminal_gets_one_line_rewritten_and_cleared() -> None:
    clock, stream = _Clock(), _Terminal()
    progress = Progress(stream, clock=clock)
    progress.update("loading the checkpoint")
    clock.now += 1.0
    progress.update("token 1/2")
    progress.done()
    text = stream.getvalue()
    assert "\n" not in text and text.startswith("\r[  0.0 s] loading the checkpoint")
    assert "\r[  1.0 s] token 1/2" in text and text.endswith("\r")
