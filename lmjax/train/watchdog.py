"""The watchdog: a run whose steps stop finishing ends, leaving every thread's stack in a file.

Dispatch is asynchronous, so a step counts as finished when its loss is ready on the device: a
waiter thread blocks on each step's loss in turn (`jax.block_until_ready`), and a watcher thread
checks how long ago the last one finished. When that exceeds the limit, every thread's Python stack
is written to `<run_dir>/hang-<process>.txt` (`faulthandler`), one line goes to stderr and the
process exits with HANG_EXIT_CODE, so that a scheduler requeues it; the run directory resumes from
its newest checkpoint.

Nothing is watched before the first step finishes (the first compile and run), nor inside the
`excused` hooks (evaluation, checkpointing, roll-back), whose time is not the steps'. The limit is
`train.step_timeout` seconds, or with None `AUTO_FACTOR` times the median time between finished
steps (over the last 100, once `AUTO_WARMUP` are in), at least `AUTO_FLOOR_SECONDS`; 0 turns it off.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import jax

from lmjax.exits import exit_if_peer_lost

HANG_EXIT_CODE = 4
AUTO_FACTOR, AUTO_FLOOR_SECONDS, AUTO_WARMUP = 10.0, 300.0, 5


class StepTimeout:
    """The limit in seconds between finished steps: `step_timeout` (> 0), or (None) automatic from
    the intervals recorded with `finished`; `limit()` is None while nothing is watched."""

    def __init__(self, step_timeout: float | None):
        self.step_timeout, self.last, self.intervals = step_timeout, None, deque(maxlen=100)

    def finished(self, now: float) -> None:
        """A step finished at `now` (time.monotonic())."""
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def limit(self) -> float | None:
        if self.last is None or self.step_timeout == 0:
            return None
        if self.step_timeout is not None:
            return self.step_timeout
        if len(self.intervals) < AUTO_WARMUP:
            return AUTO_FLOOR_SECONDS
        return max(AUTO_FLOOR_SECONDS, AUTO_FACTOR * statistics.median(self.intervals))


class Watchdog:
    """The hook (after every step) and, as a context manager, its two daemon threads."""

    def __init__(self, run_dir: Path, step_timeout: float | None, process: int | None = None):
        self.timeout = StepTimeout(step_timeout)
        self.path = Path(run_dir) / f"hang-{jax.process_index() if process is None else process}.txt"
        self.steps, self.stop, self.excused_depth = queue.Queue(), threading.Event(), 0

    def __call__(self, run, metrics, routing=None) -> None:
        if self.timeout.step_timeout != 0:
            self.steps.put(metrics["loss"])

    @contextmanager
    def excused(self):
        """Not watched inside (evaluation, saves); the clock restarts after."""
        self.excused_depth += 1
        try:
            yield
        finally:
            self.excused_depth -= 1
            if self.timeout.last is not None:
                self.timeout.last = time.monotonic()

    def excusing(self, hook):
        """`hook` run inside `excused`."""
        def excused_hook(*args):
            with self.excused():
                return hook(*args)
        return excused_hook

    def _wait_for_steps(self) -> None:
        """Block on each step's loss in turn. A step that failed ends the waiting (its error reaches the
        main thread too), at once with one line if another process died (its collective failed)."""
        while (loss := self.steps.get()) is not None:
            try:
                jax.block_until_ready(loss)
            except Exception as e:
                exit_if_peer_lost(e)
                return
            self.timeout.finished(time.monotonic())

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            limit = self.timeout.limit()
            if limit is not None and not self.excused_depth and time.monotonic() - self.timeout.last > limit:
                self._trip(limit)

    def _trip(self, limit: float) -> None:
        with self.path.open("w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        print(f"lmjax: error: no training step finished for {limit:.0f} s (train.step_timeout); every thread's "
              f"stack is in {self.path}; the run resumes from its newest checkpoint.", file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)

    def __enter__(self):
        self.threads = [threading.Thread(target=t, daemon=True, name=f"lmjax-watchdog-{t.__name__.strip('_')}")
                        for t in (self._wait_for_steps, self._watch)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.steps.put(None)
