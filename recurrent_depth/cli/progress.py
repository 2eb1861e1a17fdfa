"""Progress of a long CLI run on stderr (stdout stays clean for --json and pipes).

In a terminal the status is one line rewritten in place and cleared at the end. When stderr is not a terminal
nothing is written for a short run; once the run has lasted `after_s` seconds, a plain line at most every
`every_s` seconds, so a log of a long run shows it is alive.

    progress = Progress()
    progress.update("loading the checkpoint")
    progress.update(f"token {i}/{n}")
    progress.done()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Status messages on `stream` (default sys.stderr); see the module docstring for when they show."""

    def __init__(self, stream: TextIO | None = None, after_s: float = 5.0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.start = clock()
        self.last: float | None = None  # when the last plain line was written
        self.width = 0  # characters of the live line on screen

    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, message: str) -> None:
        """Show `message` (with the elapsed seconds) now in a terminal; in a log, only if it is due."""
        now = self.clock()
        text = f"[{now - self.start:5.1f} s] {message}"
        if self.live:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif now - self.start >= self.after_s and (self.last is None or now - self.last >= self.every_s):
            self.stream.write(text + "\n")
            self.last = now
        else:
            return
        self.stream.flush()

    def done(self) -> None:
        """Clear the live line (a terminal's prompt or the next output starts on a clean line)."""
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
