"""Progress of a long run on stderr (stdout stays clean for --json and pipes): the one helper that `rdepth` verbs and
the training loop both use.

In a terminal the status is one line, rewritten at each update and cleared at the end. Anywhere else (a log file,
`nohup`, a pipe) it is complete lines: nothing for the first `after_s` seconds (a short run stays quiet), then the
latest status at most once every `every_s` seconds, written by the update that falls due or, while a long stage
sends none, by a background thread, so that the log shows the run is alive and where it is.
`update(..., keep=True)` writes a line that stays, at once (training's last step). A disabled `Progress` (another
rank, `log.progress: false`) writes nothing and starts no thread.

    with Progress() as progress:                          # rdepth generate / inspect: quiet for 5 s, then every 10 s
        progress.update("loading the checkpoint")
        progress.update(f"token {i}/{n}")

    progress = Progress(after_s=0.0, every_s=30.0)        # training: the first step at once, then every 30 s
    #   [  62.0 s] train step 40/100 (40%) loss=2.3456 tok_s=1,234 depth=3+2 eta=0:01:33
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Status messages on `stream` (default sys.stderr); see the module docstring for when they show.

    after_s / every_s: seconds, only off a terminal (quiet start; least gap between two lines). clock: seconds
    (monotonic), replaceable in tests."""

    def __init__(self, stream: TextIO | None = None, after_s: float = 5.0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.start = clock()
        self.message: str | None = None
        self.width = 0  # characters of the live line on screen
        self.written: float | None = None  # off a terminal: when the last line was written (clock seconds)
        self._lock = threading.Lock()  # the heartbeat and the caller's updates write whole lines, one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled and not self.live:
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

    def update(self, message: str, keep: bool = False) -> None:
        """The current status: shown at once in a terminal; off one, written when a line is due. `keep`: a line
        that stays, written now (off a terminal, due or not; in a terminal, the live line ends here and the next
        update starts a new one)."""
        if not self.enabled:
            return
        self.message = message
        if not self.live:
            self._write_if_due(force=keep)
            return
        text = self._line()[: shutil.get_terminal_size().columns - 1]  # a wrapped line would not be rewritten
        self.stream.write("\r" + text.ljust(self.width) + ("\n" if keep else ""))
        self.stream.flush()
        self.width = 0 if keep else len(text)

    def _write_if_due(self, force: bool = False) -> float:
        """Off a terminal: write the latest status as a line if one is due (or `force`); returns the seconds until
        the next one may be."""
        with self._lock:
            t = self.clock()
            wait = self.after_s - (t - self.start) if self.written is None else self.every_s - (t - self.written)
            if self.message is not None and (force or wait <= 0):
                self.stream.write(f"[{t - self.start:5.1f} s] {self.message}\n")
                self.stream.flush()
                self.written, wait = t, self.every_s
            return wait if wait > 0 else self.every_s

    def _heartbeat(self) -> None:
        wait = self.after_s
        while not self._stop.wait(max(wait, 0.0)):
            wait = self._write_if_due()

    def done(self) -> None:
        """Stop the heartbeat, or clear the live line (the next output starts on a clean line)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
