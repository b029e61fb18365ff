"""Orbax checkpoints of a run: train state + data-iterator state + config, per step.

Checkpoints live in `<run_dir>/checkpoints/<step>/`. Saves are asynchronous (training
continues while arrays are written) and atomic: Orbax writes to a temporary directory
and renames it when complete, so a save interrupted mid-write is never listed and never
restored. Restoring takes an abstract state carrying the target shardings, so a
checkpoint can be read onto any mesh (or one CPU); `restore_params` reads the weights
alone. A weights-only checkpoint (`save_weights`: an imported model) stores {"params":
weights} as its state, without optimizer state; `restore_params` reads both kinds.

What is written is never non-finite: `save` checks the state on its devices first and raises
`NonFiniteState` instead of writing NaN or inf, so rotation under `keep` only ever drops finite
checkpoints for newer finite ones. A save that the disk refuses (full, read-only, no permission)
raises `SaveFailed` with one line, at that save or, being asynchronous, at the next save or `wait`;
its partial directory is removed and the previous checkpoint stays loadable. With several processes
every process raises it, not only the one whose write failed: the others would wait for that one
in Orbax's barriers (`Checkpointer.wait`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# what a failed write says (tensorstore's message, or the OSError's), and what lmjax calls it
DISK_ERRORS = {"No space left": "the disk is full", "RESOURCE_EXHAUSTED": "the disk is full",
               "Disk quota exceeded": "the disk quota is used up", "Read-only file system": "the disk is read-only",
               "Permission denied": "permission denied"}
DISK_REASONS = list(dict.fromkeys(DISK_ERRORS.values()))


def disk_error_reason(error: Exception) -> str | None:
    """What lmjax calls the disk error `error` (one of DISK_REASONS), or None if it is not one."""
    return next((why for marker, why in DISK_ERRORS.items() if marker in str(error)), None)


class NonFiniteState(ValueError):
    """A state holding NaN or inf was not saved."""


class SaveFailed(OSError):
    """A checkpoint could not be written; the message is one line for the user."""


@jax.jit
def _finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(tree) -> bool:
    """Whether every floating-point array of `tree` is finite; reduced on the arrays' devices,
    one boolean comes to the host."""
    return bool(_finite([x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]))


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class _FailedSaves(logging.Filter):
    """Orbax logs a failed background save's traceback several times over; the error itself comes
    back at the next save or wait (`SaveFailed`'s one line, or the original exception). The filter
    keeps those records quiet and their errors in `errors`: with several processes, that is how
    `Checkpointer.wait` learns of this process's failed write while Orbax's threads wait in barriers."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname
        if failed:
            self.errors.append(record.exc_info[1])
        return not failed


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run directory."""

    def __init__(self, run_dir: Path, keep: int = 2, async_save: bool = True):
        # directories made before `save` returns: made in the background, a refused one (a read-only disk) left
        # Orbax's writer threads waiting for it, so the process hung at exit for their 5-minute timeout
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.pending = None  # (step, bytes) of the save in flight
        self.seconds = {"save": 0.0, "restore": 0.0}  # spent blocked in saves (and waits) and restores
        self.warned_space, self.closed = False, False
        self.failed = None  # the SaveFailed raised, after which nothing is pending
        logging.getLogger("absl").addFilter(_FAILED_SAVES)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Start saving (returns before the write completes; see `wait`). Raises NonFiniteState,
        writing nothing, if `state` holds NaN or inf; SaveFailed if this save or the previous one
        could not be written."""
        self.wait()  # Orbax waits for the previous save here anyway; its failure is reported as its own
        if not all_finite(state):  # (waits for the state's last step: step time, not save time)
            raise NonFiniteState(f"not saving step {step}: its weights or optimizer state hold NaN or inf; the "
                                 f"newest checkpoint (step {self.latest_step()}) is kept.")
        with self._timed("save"):
            self._write(step, self._expected_bytes(state), ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ))

    @contextmanager
    def _timed(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def _write(self, step: int, expected_bytes: int, args) -> None:
        self.check_space(expected_bytes)
        self.pending = (step, expected_bytes)
        _FAILED_SAVES.errors.clear()
        self._reporting_disk_errors(lambda: self.manager.save(step, args=args, force=True))

    def _expected_bytes(self, state) -> int:
        """The newest checkpoint's size on disk, or before the first one the bytes of `state`'s arrays."""
        latest = self.latest_step()
        if latest is not None and (self.directory / str(latest)).is_dir():
            return directory_bytes(self.directory / str(latest))
        return sum(x.nbytes for x in jax.tree.leaves(state))

    def check_space(self, expected_bytes: int) -> None:
        """Print one warning (once) when the disk holds fewer than two more checkpoints of `expected_bytes`."""
        free = shutil.disk_usage(self.directory).free
        if free < 2 * expected_bytes and not self.warned_space and jax.process_index() == 0:
            self.warned_space = True
            print(f"warning: {self.directory} has {free:,} bytes free, room for fewer than two more checkpoints of "
                  f"{expected_bytes:,} bytes; free space or a save will fail.", flush=True)

    def _reporting_disk_errors(self, write) -> None:
        """Run `write`; a disk error (of the pending save) becomes one SaveFailed line."""
        try:
            write()
        except Exception as e:
            reason = disk_error_reason(e)
            if reason is None or self.pending is None:
                raise
            raise self._failed(reason) from None

    def _failed(self, reason: str, process: int | None = None) -> SaveFailed:
        """The pending save's SaveFailed (`process`: the one whose write failed, if there are several),
        after removing its partial directory."""
        step, expected = self.pending
        self.pending = None
        if jax.process_index() == 0:
            self._remove_partial(step)
        kept = [s for s in self.manager.all_steps() if s != step and (self.directory / str(s)).is_dir()]
        free = shutil.disk_usage(self.directory).free
        whose = "" if process is None else f"process {process}'s write: "
        self.failed = SaveFailed(f"could not save checkpoint step {step} in {self.directory}: {reason} ({whose}the "
                                 f"save needs about {expected:,} bytes, {free:,} are free); "
                                 + (f"the checkpoint of step {max(kept)} is intact; " if kept else "")
                                 + "make room (or set train.run_dir elsewhere) and run the same command to resume.")
        return self.failed

    def _remove_partial(self, step: int, settle_seconds: float = 1.0, timeout_seconds: float = 30.0) -> None:
        """Remove `step`'s partial directory. The failed item's error can surface while the other
        items' writes still run and recreate it, so remove until it has stayed gone for settle_seconds."""
        deadline = time.monotonic() + timeout_seconds
        gone_since = None
        while time.monotonic() < deadline:
            partials = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            now = time.monotonic()
            gone_since = (gone_since or now) if not partials else None
            if gone_since is not None and now - gone_since >= settle_seconds:
                return
            time.sleep(0.1)

    def save_weights(self, step: int, params, config: dict) -> None:
        """Start saving a weights-only checkpoint: `params` (an nnx.State) without optimizer
        state, step or rng, and an empty data state (see `wait`); refuses NaN or inf as `save` does."""
        self.wait()
        if not all_finite(params):
            raise NonFiniteState(f"not saving step {step}: its weights hold NaN or inf.")
        self._write(step, self._expected_bytes(params), ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            data=ocp.args.JsonSave({}),
            config=ocp.args.JsonSave(config),
        ))

    def holds_optimizer_state(self, step: int | None = None) -> bool:
        """False for a weights-only checkpoint (`save_weights`), True for a full one; reads no array."""
        return "opt_state" in self.state_fields(step)

    def state_fields(self, step: int | None = None) -> set[str]:
        """The top-level fields of the state saved in checkpoint `step` (default: newest); reads no array."""
        step = self.latest_step() if step is None else step
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}  # a reader that knows every item, so nothing warns
        reader = ocp.CheckpointManager(self.manager.directory, item_handlers=handlers)
        saved = reader.item_metadata(step)["state"].tree
        reader.close()
        return set(saved)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, config) of `step` (default: newest). `abstract_state` is a
        pytree of jax.ShapeDtypeStruct with `sharding` set: arrays land in that layout."""
        step = self.latest_step() if step is None else step
        with self._timed("restore"):
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
        """Block until pending asynchronous saves are complete; SaveFailed if one could not be written
        (with several processes, on every process when any one's write failed). All processes call it
        at the same points (it is collective then). After a SaveFailed it returns at once."""
        if self.failed is not None:
            return
        with self._timed("save"):
            if jax.process_count() > 1:
                self._agree_on_the_save()
            self._reporting_disk_errors(self.manager.wait_until_finished)
        self.pending = None

    def _agree_on_the_save(self, poll_seconds: float = 0.05) -> None:
        """Several processes: poll until every process's save is complete, or raise SaveFailed on every
        process as soon as one's write failed on the disk. Orbax would leave every process waiting in
        a barrier (the failed one's finalizing thread too) for AsyncOptions.timeout_secs (20 min) and
        then time out. One all-gather of a number per poll, in lockstep, so all decide alike."""
        while True:
            reasons = [r for r in map(disk_error_reason, _FAILED_SAVES.errors) if r] if self.pending else []
            status = 2 + DISK_REASONS.index(reasons[0]) if reasons else int(not self.manager.is_saving_in_progress())
            statuses = multihost_utils.process_allgather(np.int32(status))
            failed = np.flatnonzero(statuses >= 2)
            if failed.size:
                raise self._failed(DISK_REASONS[statuses[failed[0]] - 2], process=int(failed[0]))
            if statuses.min() == 1:
                return
            time.sleep(poll_seconds)

    def close(self) -> None:
        """Wait for the pending save and close. With several processes, after a SaveFailed Orbax's
        threads wait in a barrier for the failed write for good: nothing is closed, and the process
        ends with os._exit (`lmjax.cli`)."""
        if self.failed is None or jax.process_count() == 1:
            self.manager.close()
        self.closed = True


_FAILED_SAVES = _FailedSaves()


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
