"""Progress of a long CLI run on stderr (stdout stays clean for --json and pipes).

In a terminal the status is one line rewritten at each update and cleared at the end. When stderr is not a
terminal a short run writes nothing; once the run has lasted `after_s` seconds, a background thread writes the
latest status as a plain line every `every_s` seconds, so the log of a long run (even one long stage) shows it is
alive and where it is.

    with Progress() as progress:
        progress.update("loading the checkpoint")
        progress.update(f"token {i}/{n}")
"""

from __future__ import annotations

import sys
import threading
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
        self.message: str | None = None
        self.width = 0  # characters of the live line on screen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.live:
            self._thread = threading.Thread(target=self._heartbeat, name="rdepth-progress", daemon=True)
            self._thread.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self.clock() - self.start

    def _line(self) -> str:
        return f"[{self.elapsed():5.1f} s] {self.message}"

    def update(self, message: str) -> None:
        """The current status: shown now in a terminal, by the heartbeat in a log."""
        self.message = message
        if self.live:
            text = self._line()
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def _heartbeat(self) -> None:
        if self._stop.wait(self.after_s):
            return
        while True:
            if self.message is not None:
                self.stream.write(self._line() + "\n")
                self.stream.flush()
            if self._stop.wait(self.every_s):
                return

    def done(self) -> None:
        """Stop the heartbeat, or clear the live line (the next output starts on a clean line)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
