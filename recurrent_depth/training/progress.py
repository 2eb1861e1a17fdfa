"""Training progress on stderr: a tqdm bar on a terminal, plain log lines otherwise.

A tqdm bar redraws one line with carriage returns; under `nohup` or a redirect that makes one ever-growing line in
the log. When stderr is not a terminal, `LineProgress` prints one complete line at the first step (the run is
alive), then every `interval_s` seconds and at the last step, instead:

    train step 40/100 (40%) loss=2.3456 tok_s=1,234 depth=3+2 elapsed=0:01:02
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

LINE_INTERVAL_S = 30.0  # seconds between plain progress lines


class LineProgress:
    """The subset of tqdm's interface the training loop uses (set_postfix, then update; close)."""

    def __init__(self, total: int, initial: int, stream: TextIO, interval_s: float = LINE_INTERVAL_S) -> None:
        self.total, self.n, self.stream, self.interval_s = total, initial, stream, interval_s
        self.postfix: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.last: float | None = None  # when the last line was printed

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.last is None or now - self.last >= self.interval_s or self.n >= self.total:
            self.last = now
            fields = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            elapsed = timedelta(seconds=round(now - self.t0))
            print(f"train step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%) {fields} "
                  f"elapsed={elapsed}", file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to release (the interface tqdm has)."""


def progress(total: int, initial: int, enabled: bool, stream: TextIO | None = None) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal, else LineProgress; a disabled tqdm when not
    `enabled` (other ranks, log.progress false)."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return LineProgress(total, initial, stream)
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                file=stream)
