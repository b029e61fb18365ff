"""Goodput: where a run's wall time went, summed over every invocation (resubmissions included).

Each invocation of `train` splits its wall time (from entering `train` to leaving it) into
PARTS; "other" is what the named parts leave (loading data and building the model, the sample
and the plot at the end), so the parts sum exactly to the wall time. The step loop's time,
less the evaluation, saves, restores (roll-backs) and data waits inside it, is the steps' time;
it is split between productive and redone steps by their counts. A step is redone when the run
had already reached it: after a resume from an earlier checkpoint (the step the run had reached is
the larger of the last goodput.json's and the last step metrics.jsonl held before the resume
dropped its later records), or after a roll-back. `<run_dir>/goodput.json` holds the totals; an
invocation killed outright (SIGKILL) writes none, but the steps it lost are counted as redone by
the next.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from lmjax.files import write_json_atomically

PARTS = ("productive_steps", "redone_steps", "compilation", "checkpoint_saves", "checkpoint_restores", "evaluation",
         "data_waiting", "other")


class Goodput:
    """The hook (after every step) counting productive and redone steps, the `loop` context around
    the step loop, and `report` at the end of the invocation.

    `evaluation_seconds()` gives the seconds spent evaluating so far (the evaluation hook's count)."""

    def __init__(self, run, start: float, evaluation_seconds):
        self.start, self.evaluation_seconds = start, evaluation_seconds
        self.path = Path(run.run_dir) / "goodput.json"
        self.previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.highest = max(self.previous.get("highest_step", 0), run.logger.highest_step_before_resume, run.step)
        self.counts = {"productive_steps": 0, "redone_steps": 0}
        self.loop_seconds, self.loop_overheads = 0.0, 0.0

    def __call__(self, run, metrics=None, routing=None) -> None:
        if run.step > self.highest:
            self.highest = run.step
            self.counts["productive_steps"] += 1
        else:
            self.counts["redone_steps"] += 1

    def _overheads(self, run) -> float:
        seconds = run.checkpointer.seconds
        return seconds["save"] + seconds["restore"] + self.evaluation_seconds() + run.batches.wait_seconds

    @contextmanager
    def loop(self, run):
        """Around the step loop: its time, and the overheads counted elsewhere that happened inside it."""
        start, overheads = time.perf_counter(), self._overheads(run)
        try:
            yield
        finally:
            self.loop_seconds = time.perf_counter() - start
            self.loop_overheads = self._overheads(run) - overheads

    def split(self, run) -> dict[str, float]:
        """This invocation's seconds per part; they sum to its wall time so far."""
        wall = time.perf_counter() - self.start
        steps = self.loop_seconds - self.loop_overheads
        executed = max(sum(self.counts.values()), 1)
        parts = {"productive_steps": steps * self.counts["productive_steps"] / executed,
                 "redone_steps": steps * self.counts["redone_steps"] / executed,
                 "compilation": run.compile_seconds, "checkpoint_saves": run.checkpointer.seconds["save"],
                 "checkpoint_restores": run.checkpointer.seconds["restore"], "evaluation": self.evaluation_seconds(),
                 "data_waiting": run.batches.wait_seconds}
        parts["other"] = wall - sum(parts.values())
        return parts

    def report(self, run) -> str:
        """Add this invocation to goodput.json (process 0) and return the one-line summary of the totals."""
        parts = self.split(run)
        before = self.previous.get("seconds", {})
        totals = {k: before.get(k, 0.0) + parts[k] for k in PARTS}
        steps = {k: self.previous.get("steps", {}).get(k, 0) + self.counts[k] for k in self.counts}
        invocations = self.previous.get("invocations", 0) + 1
        wall = sum(totals.values())
        if run.main_process:
            write_json_atomically(self.path, {"invocations": invocations, "wall_seconds": wall, "seconds": totals,
                                              "steps": steps, "highest_step": self.highest})
        shares = ", ".join(f"{k.replace('_', ' ')} {totals[k]:.1f} s" for k in PARTS[1:])
        return (f"goodput {totals['productive_steps'] / wall:.0%}: productive steps {totals['productive_steps']:.1f} s "
                f"of {wall:.1f} s wall over {invocations} invocation(s); {shares}")
