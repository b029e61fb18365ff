"""Orbax checkpoints of a run: train state + data-iterator state + config, per step.

Checkpoints live in `<run_dir>/checkpoints/<step>/`. Saves are asynchronous (training
continues while arrays are written) and atomic: Orbax writes to a temporary directory
and renames it when complete, so a save interrupted mid-write is never listed and never
restored. Restoring takes an abstract state carrying the target shardings, so a
checkpoint can be read onto any mesh (or one CPU); `restore_params` reads the weights
alone. A weights-only checkpoint (`save_weights`: an imported model) stores {"params":
weights} as its state, without optimizer state; `restore_params` reads both kinds.
"""

from __future__ import annotations

import json
from pathlib import Path

import orbax.checkpoint as ocp


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

    def save_weights(self, step: int, params, config: dict) -> None:
        """Start saving a weights-only checkpoint: `params` (an nnx.State) without optimizer
        state, step or rng, and an empty data state (see `wait`)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                data=ocp.args.JsonSave({}),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def holds_optimizer_state(self, step: int | None = None) -> bool:
        """False for a weights-only checkpoint (`save_weights`), True for a full one; reads no array."""
        step = self.latest_step() if step is None else step
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}  # a reader that knows every item, so nothing warns
        reader = ocp.CheckpointManager(self.manager.directory, item_handlers=handlers)
        saved = reader.item_metadata(step)["state"].tree
        reader.close()
        return "opt_state" in saved

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

    def restore_params(self, abstract_params, step: int | None = None):
        """The weights saved in checkpoint `step` (default: newest), full or weights-only, in
        the layout of `abstract_params` (pytree of jax.ShapeDtypeStruct with `sharding`). Only
        they are read: the optimizer state (two thirds of a full checkpoint) stays on disk.
        PyTreeRestore's partial restore reads a subtree, which StandardRestore cannot; a
        manager that then saves (a resumed run) must keep to StandardRestore, hence `restore`."""
        step = self.latest_step() if step is None else step
        target = {"params": abstract_params}
        item = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=item))["state"]["params"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process received SIGTERM (JAX's
        preemption sync point; False in a single process). Call it at every step, on every process."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def write_weights_run(run_dir: Path, config: dict, params) -> None:
    """Write `config` (a Config's dict) as `run_dir`/config.json and `params` (an nnx.State) as
    its step-0 weights-only checkpoint (`Checkpointer.save_weights`): the run directory that
    `convert from-hf`, `lora merge` and `upcycle` write (each copies the tokenizer itself)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    checkpointer = Checkpointer(run_dir, async_save=False)
    checkpointer.save_weights(0, params, config)
    checkpointer.wait()
    checkpointer.close()
