"""Roll back, then stop: what the host does about bad steps (judged in the step, `lmjax.train.guard`).

`Rollback` is a hook of the step loop. At log steps, checkpoint steps and the last step of the
invocation (where the host reads anyway) it reads the guard's counters from the train state; after
`train.max_bad_steps` bad steps in a row it restores the newest checkpoint and moves the data
`train.rollback_skip_batches` batches past that checkpoint's position (PaLM's recipe), at most
`train.max_rollbacks` times in a run; then it raises `Diverged` (`lmjax train` exits 3).

Roll-backs are recorded in `<run_dir>/rollbacks.jsonl` ({"step", "checkpoint", "data_step"}); a
run that resumes from a checkpoint it had rolled back to continues from the recorded data position,
so a resubmitted run makes the same choices and counts the same roll-backs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from lmjax.checkpoint import Checkpointer
from lmjax.records import read_records
from lmjax.train import loggers
from lmjax.train.guard import init_guard
from lmjax.train.state import TrainState


class Diverged(RuntimeError):
    """Too many bad steps in a row after every allowed roll-back; the message is one line."""


def restore_train_state(checkpointer: Checkpointer, abstract: TrainState, step: int | None = None):
    """(state, data_state, config) of checkpoint `step` (default: newest) in the layout of
    `abstract`. A checkpoint written before bad-step judgment existed has no `guard`: it is
    restored without one and starts a fresh guard (nothing judged yet)."""
    if "guard" in checkpointer.state_fields(step) or abstract.guard is None:
        return checkpointer.restore(abstract, step)
    saved = {name: value for name, value in abstract._asdict().items() if name != "guard"}
    state, data_state, config = checkpointer.restore(saved, step)
    guard = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), init_guard(), abstract.guard)
    return TrainState(**state, guard=guard), data_state, config


def read_rollbacks(run_dir: Path) -> list[dict]:
    """The roll-backs of the run in `run_dir`, oldest first."""
    return read_records(Path(run_dir) / "rollbacks.jsonl")


class Rollback:
    """The hook (call it after every step). `on_rollback(step)` callbacks hear of each roll-back
    (the step clock and the progress bar restart there)."""

    def __init__(self, run, on_rollback: tuple[Callable[[int], None], ...] = ()):
        self.train, self.on_rollback = run.cfg.train, on_rollback
        self.done = read_rollbacks(run.run_dir)
        here = [r for r in self.done if r["checkpoint"] == run.step]
        if run.resuming and here:  # resubmitted after rolling back to this checkpoint: go on as it did
            run.batches.restore({**run.data_state(), "step": here[-1]["data_step"]})

    def __call__(self, run, metrics=None, routing=None) -> None:
        t = self.train
        if run.step % t.log_every == 0 or run.step % t.checkpoint_every == 0 or run.step == run.halt:
            self.check(run)

    def check(self, run) -> None:
        """Roll back, or raise Diverged, when the train state has seen max_bad_steps bad steps in a row."""
        in_a_row = int(jax.device_get(run.state.guard.most_in_a_row))
        if in_a_row < self.train.max_bad_steps:
            return
        newest = run.checkpointer.latest_step()
        if newest is None or len(self.done) >= self.train.max_rollbacks:
            raise Diverged(self.verdict(run, in_a_row, newest))
        self.roll_back(run, newest, in_a_row)

    def verdict(self, run, in_a_row: int, newest: int | None) -> str:
        optim = run.cfg.optim
        where = (f"the newest good checkpoint is step {newest} in {run.checkpointer.directory}" if newest is not None
                 else "there is no checkpoint to roll back to")
        return (f"diverged at step {run.step}: {in_a_row} bad steps in a row (non-finite or spiking loss) after "
                f"{len(self.done)} roll-back(s); {where}; lower optim.lr (now {optim.lr:g}) or set optim.clip_norm "
                f"(now {optim.clip_norm}) and resume.")

    def roll_back(self, run, newest: int, in_a_row: int) -> None:
        """Restore checkpoint `newest` and move the data rollback_skip_batches past where it (or the
        previous roll-back to it) left off."""
        run.checkpointer.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
        state, data_state, _ = restore_train_state(run.checkpointer, abstract, newest)
        sharding = state.guard.most_in_a_row.sharding  # two buffers: the step donates each
        run.state = state._replace(guard=state.guard._replace(bad_in_a_row=jax.device_put(np.int32(0), sharding),
                                                              most_in_a_row=jax.device_put(np.int32(0), sharding)))
        earlier = [r["data_step"] for r in self.done if r["checkpoint"] == newest]
        data_step = (earlier[-1] if earlier else data_state["step"]) + self.train.rollback_skip_batches
        run.batches.restore({**data_state, "step": data_step})
        record = {"step": run.step, "checkpoint": newest, "data_step": data_step}
        self.done.append(record)
        if run.main_process:
            loggers.console(f"step {run.step}: {in_a_row} bad steps in a row; rolled back to step {newest} and "
                            f"skipping {self.train.rollback_skip_batches} batches (roll-back {len(self.done)} of "
                            f"{self.train.max_rollbacks})")
            with (Path(run.run_dir) / "rollbacks.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        run.step = newest
        run.logger.drop_after(newest)
        for restart in self.on_rollback:
            restart(newest)
