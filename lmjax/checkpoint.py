"""Orbax checkpoints of a run: train state + data-iterator state + config, per step.

Checkpoints live in `<run_dir>/checkpoints/<step>/`. Saves are asynchronous (training
continues while arrays are written) and atomic: Orbax writes to a temporary directory
and renames it when complete, so a save interrupted mid-write is never listed and never
restored. Restoring takes an abstract state carrying the target shardings, so a
checkpoint can be read onto any mesh (or one CPU); `restore_some` reads only part of it.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

SKIP = ocp.PLACEHOLDER  # a leaf of an abstract state that `Checkpointer.restore_some` does not read


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run directory."""

    def __init__(self, run_dir: Path, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Start saving (returns before the write completes; see `wait`)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, config) of `step` (default: newest). `abstract_state` is a
        pytree of jax.ShapeDtypeStruct with `sharding` set: arrays land in that layout."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["config"]

    def restore_data(self, step: int | None = None) -> dict:
        """The data-iterator state of `step` (default: newest), without reading any array."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def saved_config(self, step: int | None = None) -> dict:
        """The config saved with checkpoint `step` (default: newest), as a dict."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_some(self, abstract_state, step: int | None = None):
        """The saved state of `step` (default: newest) without the leaves that `abstract_state`
        marks `SKIP`: those are never read from disk and come back as `SKIP` (e.g. the Adam
        moments, two thirds of a checkpoint, when only the weights are wanted). It reads with
        PyTreeRestore, which accepts SKIP where StandardRestore does not; a manager that then
        saves (a resumed run) must keep to StandardRestore, hence the two methods."""
        step = self.latest_step() if step is None else step
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        item = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
        return self.manager.restore(step, args=ocp.args.Composite(state=item))["state"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process received SIGTERM (JAX's
        preemption sync point; False in a single process). Call it at every step, on every process."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

