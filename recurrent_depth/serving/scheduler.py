"""The scheduler: one background thread that owns the `BatchEngine` and steps it while any sequence is live.

Requests arrive from the HTTP server's event loop (or from `rdepth chat`); each is a list of `Sequence`s (one per
choice). They wait in a bounded queue and join the batch as rows free up, between engine steps; a sequence leaves
when it finishes or when its client goes away (`cancel`), which frees its row at the next step.

    sched = Scheduler(engine, max_queue=256); sched.start()
    handle = sched.submit(seqs)                     # asyncio side: `async for event in handle.events()`
    handle.cancel()                                 # client disconnected
    sched.stop()

Events reach the asyncio side through `loop.call_soon_threadsafe`, so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable

from recurrent_depth.serving.engine import BatchEngine, Sequence, TokenEvent

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (`--max-queue`)."""


class Handle:
    """A submitted request: its sequences and a stream of (choice index, TokenEvent) pairs."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence], notify: Callable[[int, TokenEvent], None]) -> None:
        self.scheduler, self.seqs = scheduler, seqs
        for i, seq in enumerate(seqs):
            seq.on_event = (lambda event, i=i: notify(i, event))

    def cancel(self) -> None:
        self.scheduler.cancel(self.seqs)

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class AsyncHandle(Handle):
    """A handle whose events are read on an asyncio loop."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence], loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        super().__init__(scheduler, seqs, lambda i, ev: loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev)))

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Every event of every choice until all choices have finished."""
        remaining = len(self.seqs)
        while remaining:
            i, event = await self.queue.get()
            if event.finish_reason is not None:
                remaining -= 1
            yield i, event


class Scheduler:
    """Feeds waiting sequences into the engine between steps and steps it on a background thread."""

    def __init__(self, engine: BatchEngine, max_queue: int = 256) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._waiting: deque[Sequence] = deque()
        self._cancelled: list[Sequence] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # engine steps run (for stats)
        self.peak_running = 0  # most sequences decoded together so far
        self.aborted = 0  # sequences dropped because their client went away
        self.kv_bytes = 0  # bytes the KV store's pools hold (updated by the engine thread after each step)
        self.kv_bytes_in_use = 0  # bytes of the pages live sequences hold
        self.peak_kv_bytes_in_use = 0
        self.live_tokens = 0  # positions the live sequences hold in the cache

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="rdepth-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop | None = None,
               notify: Callable[[int, TokenEvent], None] | None = None) -> Handle:
        """Queue the sequences of one request; events go to `loop` (an `AsyncHandle`) or to `notify(i, event)`.
        Raises QueueFull when more than `max_queue` sequences would wait."""
        handle = (AsyncHandle(self, seqs, loop) if loop is not None
                  else Handle(self, seqs, notify or (lambda i, ev: None)))
        with self._cond:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting (limit {self.max_queue})")
            self._waiting.extend(seqs)
            self._cond.notify_all()
        return handle

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences (client gone); their rows are freed before the next engine step."""
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
            self._cancelled.extend(seqs)
            self._cond.notify_all()

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.engine.live), "waiting": len(self._waiting), "max_batch": self.engine.max_rows,
                "peak_running": self.peak_running, "aborted": self.aborted, "engine_steps": self.steps,
                "kv_cache_bytes": self.kv_bytes, "kv_bytes_in_use": self.kv_bytes_in_use,
                "peak_kv_bytes_in_use": self.peak_kv_bytes_in_use, "live_tokens": self.live_tokens}

    # ---------------------------------------------------------------------------------------------- loop
    def _measure(self) -> None:
        store = self.engine.store
        self.kv_bytes, self.kv_bytes_in_use = store.nbytes(), store.bytes_in_use()
        self.peak_kv_bytes_in_use = max(self.peak_kv_bytes_in_use, self.kv_bytes_in_use)
        self.live_tokens = sum(s.length for s in self.engine.live)

    def _admit(self) -> None:
        """Under the lock: drop cancelled sequences, then move waiting ones into free rows (first come first)."""
        for seq in self._cancelled:
            if seq.finish_reason is None:
                if seq in self.engine.live:
                    self.engine.remove(seq)
                seq.finish_reason = "abort"
                self.aborted += 1
                seq.on_event(TokenEvent("", None, None, "abort"))
        self._cancelled.clear()
        while self._waiting and self.engine.free_rows:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            try:
                self.engine.add(seq)
            except (ValueError, RuntimeError) as err:  # checked before submit; reported, never fatal
                seq.finish_reason = "error"
                seq.on_event(TokenEvent(str(err), None, None, "error"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.live and not self._waiting and not self._cancelled:
                    self._cond.wait()
                if self._stop:
                    break
                self._admit()
            if not self.engine.live:
                self._measure()  # sequences removed on cancel gave their pages back
                continue
            self.peak_running = max(self.peak_running, len(self.engine.live))
            try:
                self.engine.step()
                self.steps += 1
                self._measure()
            except Exception:  # a bug must not take the server down: fail the live sequences, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                for seq in list(self.engine.live):
                    self.engine.remove(seq)
                    seq.finish_reason = "error"
                    seq.on_event(TokenEvent("internal error while generating", None, None, "error"))
        for seq in list(self.engine.live) + list(self._waiting):
            if seq in self.engine.live:
                self.engine.remove(seq)
            seq.finish_reason = "abort"
            seq.on_event(TokenEvent("", None, None, "abort"))
