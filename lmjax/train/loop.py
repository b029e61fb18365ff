"""The training run: set up, a plain step loop that calls hooks, and the finish.

`train(cfg, run_dir)` starts a run or, when `run_dir` holds checkpoints, continues it
exactly where its newest checkpoint left off. Everything a run writes goes under
`run_dir`: config.json, metrics.jsonl, checkpoints/, loss.png, sample.txt, wandb/.

The parts: `setup` (lmjax.train.run) returns a `Run`; `step_loop` trains it, asking its
stop signals before every step and calling each `Hook` that is due after a step
(logging, evaluation, checkpointing); `finish` saves, evaluates and samples. A new
periodic action is one more Hook; a new reason to stop (a signal, a preemption notice) is
one more stop signal, a callable `(run) -> bool`.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from lmjax.checkpoint import NonFiniteState
from lmjax.config import Config
from lmjax.exits import exit_if_peer_lost
from lmjax.families import family_of
from lmjax.parallel import pipeline_note
from lmjax.records import read_metrics
from lmjax.scaling.counting import example_lengths, param_counts, run_flops_per_token, tokens_per_step
from lmjax.train import loggers
from lmjax.train.evaluate import evaluate
from lmjax.train.goodput import Goodput
from lmjax.train.metrics import mfu, peak_flops_per_device
from lmjax.train.rollback import Rollback
from lmjax.train.run import Run, setup
from lmjax.train.watchdog import Watchdog


@dataclass(frozen=True)
class Hook:
    """`fn(run, metrics, routing)` after every `every`-th step, with that step's metrics and MoE
    routing statistics (device arrays). The last step of the invocation (`run.halt`) is left
    to `finish` unless `at_halt`."""

    fn: Callable[[Run, dict, dict], None]
    every: int
    at_halt: bool = False

    def due(self, step: int, halt: int) -> bool:
        return (step % self.every == 0 and step != halt) or (step == halt and self.at_halt)


def step_loop(run: Run, hooks: list[Hook], stop_signals: list[Callable[[Run], bool]]) -> None:
    """Train `run` from `run.step` up to `run.halt`, calling the hooks that are due after each
    step. Before every step every stop signal is asked (all of them, so a signal that must be
    called on every process at every step, like a preemption sync point, always is); the
    loop ends early when any says stop."""
    while run.step < run.halt and not any([stop(run) for stop in stop_signals]):
        run.state, metrics, routing = run.train_step(run.state, run.next_batch())
        run.step += 1
        for hook in hooks:
            if hook.due(run.step, run.halt):
                hook.fn(run, metrics, routing)


class StepClock:
    """Wall-clock seconds per training step between two laps, leaving out time spent inside
    `paused()` (evaluation)."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int) -> None:
        """Count from now, at `step` (the start, or a roll-back to an earlier step)."""
        self.start, self.step, self.paused_seconds = time.perf_counter(), step, 0.0

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def lap(self, step: int) -> float:
        """Seconds per step since the last lap (or the start), which ended at step `self.step`."""
        now = time.perf_counter()
        seconds = (now - self.start - self.paused_seconds) / (step - self.step)
        self.start, self.step, self.paused_seconds = now, step, 0.0
        return seconds


class LogMetrics:
    """The logging hook: the step's metrics with tokens/s, seconds per step and MFU to
    metrics.jsonl (and wandb), routing statistics to routing.jsonl, and the progress bar's
    postfix. Fetching the metrics is the loop's one device-to-host sync."""

    def __init__(self, run: Run, clock: StepClock, bar):
        self.clock, self.bar = clock, bar
        self.step_tokens, self.flops_per_token = tokens_per_step(run.cfg), run_flops_per_token(run.cfg)
        self.peak_flops = peak_flops_per_device(run.cfg.model.dtype) * len(jax.devices())

    def __call__(self, run: Run, metrics: dict, routing: dict) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step_seconds = self.clock.lap(run.step)
        tokens_per_second = self.step_tokens / step_seconds
        record = {"step": run.step, **metrics, "tokens_per_second": tokens_per_second, "step_seconds": step_seconds,
                  "mfu": mfu(tokens_per_second, self.flops_per_token, self.peak_flops)}
        run.logger.log(record)
        if routing:
            run.logger.log_routing(run.step, jax.device_get(routing))
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                             mfu=f"{record['mfu']:.0%}", skipped=int(metrics.get("skipped_steps", 0)))


class Validate:
    """The evaluation hook: validation metrics of the current weights, logged with a `val_`
    prefix and printed; `last` keeps the newest result. Its time is left out of the clock."""

    def __init__(self, clock: StepClock):
        self.clock, self.last, self.seconds = clock, None, 0.0

    def __call__(self, run: Run, metrics: dict = None, routing: dict = None) -> dict:
        start = time.perf_counter()
        with self.clock.paused():
            cfg = run.cfg
            result = evaluate(run.graphdef, run.model_params(), run.val_set, run.tokenizer, cfg.train.batch_size,
                              cfg.train.eval_batches, run.rows)
            run.logger.log({"step": run.step, **{f"val_{k}": v for k, v in result.items()}})
            loggers.console(f"step {run.step:>6}  val loss {result['loss']:.4f}  ppl {result['perplexity']:.2f}  "
                            f"bpb {result['bits_per_byte']:.3f}")
        self.last = result
        self.seconds += time.perf_counter() - start
        return result


def save_checkpoint(run: Run, metrics: dict = None, routing: dict = None) -> None:
    """The checkpointing hook: save the state and the data iterator's position at `run.step`
    (asynchronously), unless that step is saved already or the state holds NaN or inf (one line
    says so; the newest checkpoint stays the newest)."""
    if run.checkpointer.latest_step() != run.step:  # a stop right after a periodic save has nothing new
        try:
            run.checkpointer.save(run.step, run.state, run.data_state(), run.cfg.to_dict())
        except NonFiniteState as e:
            if run.main_process:
                loggers.console(str(e))


class StopRequest:
    """A stop signal: SIGTERM (a scheduler's time limit, scancel, preemption, maintenance),
    SIGINT (Ctrl-C) or `train.warning_signal` (SLURM's early warning) make every process stop
    after the same step; `finish` then saves it, skips the final evaluation and sample, and the
    run exits 0. A second Ctrl-C interrupts at once; a second SIGTERM and SIGCONT (what SLURM
    sends at a time limit) change nothing. Installed for the `with` block.

    In one process, Python handlers set a flag. Once jax.distributed is up, JAX's preemption
    notifier owns SIGTERM (a Python handler would replace it), so SIGINT and the warning signal
    re-send SIGTERM to their own process, and every process asks Orbax's `reached_preemption`
    (JAX's preemption sync point) before each step: it says stop on all of them at one step.
    """

    def __init__(self, warning_signal: str = "SIGUSR1"):
        self.requested, self.interrupts = False, 0
        self.distributed = jax.process_count() > 1
        own = [signal.SIGINT, signal.Signals[warning_signal]] + ([] if self.distributed else [signal.SIGTERM])
        self.signals = list(dict.fromkeys(own))

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process
        elif not self.requested:
            self.requested = True
            loggers.console(f"{signal.Signals(signum).name}: saving a checkpoint after this step and stopping "
                            "(Ctrl-C twice aborts)")

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)

    def __call__(self, run: Run) -> bool:
        if self.distributed and run.checkpointer.reached_preemption(run.step):
            if run.main_process:
                loggers.console(f"stop requested: every process saves step {run.step} and stops")
            self.requested = True
        return self.requested


def train(cfg: Config, run_dir: Path, init_from: Path | None = None, new_data_order: bool = False,
          transforms: tuple = (), restore_weights: Callable | None = None) -> dict:
    """Train (or resume) the run in `run_dir` on a mesh over all devices; returns
    {step, finished, val_*: the newest validation metrics}. A new run with `init_from` (a run
    directory) starts from that run's weights; `new_data_order` lets a resumed run change its
    batch or data; `transforms` and `restore_weights` as in `setup` (`lmjax.runs.train` passes
    those a config turns on). Every check that can fail on user input runs before compilation.
    Where the time went is added to goodput.json and printed at the end, however the
    invocation ends (`lmjax.train.goodput`)."""
    start = time.perf_counter()
    run = setup(cfg, run_dir, init_from, new_data_order, transforms, restore_weights)
    announce(run)
    bar = loggers.progress_bar(run.steps, run.step, run.main_process and cfg.log.progress_bar)
    clock = StepClock(run.step)
    validate = Validate(clock)
    goodput = Goodput(run, start, lambda: validate.seconds)
    rollback = Rollback(run, on_rollback=(clock.restart, lambda step: bar.reset(run.steps) or bar.update(step)))
    watchdog = Watchdog(run.run_dir, cfg.train.step_timeout)
    hooks = [Hook(watchdog, every=1, at_halt=True),
             Hook(lambda run, metrics, routing: bar.update(1), every=1, at_halt=True),
             Hook(goodput, every=1, at_halt=True),
             Hook(LogMetrics(run, clock, bar), cfg.train.log_every, at_halt=True),
             Hook(watchdog.excusing(rollback), every=1, at_halt=True),
             Hook(watchdog.excusing(validate), cfg.train.eval_every),
             Hook(watchdog.excusing(save_checkpoint), cfg.train.checkpoint_every)]
    try:
        with StopRequest(cfg.train.warning_signal) as stop, goodput.loop(run), watchdog:
            try:
                step_loop(run, hooks, stop_signals=[stop])
            finally:
                bar.close()
        return finish(run, validate)
    except Exception as e:  # Diverged, SaveFailed, ...: the pending save still completes (or says why not)
        exit_if_peer_lost(e)  # (but not for a dead process: closing would wait for it in Orbax's barriers)
        close(run)
        raise
    finally:
        line = goodput.report(run)
        if run.main_process:
            loggers.console(line)


def announce(run: Run) -> None:
    """One console line: the run, its size and length, compile time, the pipeline schedule and its
    bubble (with pipeline stages), where it resumed."""
    if not run.main_process:
        return
    cfg = run.cfg
    counts = param_counts(cfg.model)
    lengths = example_lengths(cfg)  # tokens/s and MFU count encoder and decoder tokens
    loggers.console(f"run {run.run_dir}  |  {counts['params_total']:,} params  |  {run.steps} steps of "
                    f"{cfg.train.batch_size}x{'+'.join(str(n) for n in lengths if n)} tokens  |  "
                    f"compiled in {run.compile_seconds:.1f}s"
                    + (f"  |  {pipeline}" if (pipeline := pipeline_note(cfg, run.mesh)) else "")
                    + (f"  |  resumed at step {run.step}" if run.resuming else ""))


def finish(run: Run, validate: Validate) -> dict:
    """End the invocation: save a checkpoint of the last step, evaluate once more and write
    loss.png and a sample if the run is complete, close the checkpointer and loggers.
    Returns {step, finished, val_*: the newest validation metrics, if any}."""
    finished = run.step == run.steps
    save_checkpoint(run)
    if finished:
        validate(run)
    close(run)
    if finished:
        # every process takes part in gathering the (possibly cross-host) weights for the sample
        sampling = run.cfg.train.sample_tokens > 0
        host_params = multihost_utils.process_allgather(run.model_params(), tiled=True) if sampling else None
        if run.main_process:
            finish_run(run.cfg, run.run_dir, run.graphdef, host_params, run.tokenizer, run.val_set)
    return {"step": run.step, "finished": finished,
            **({f"val_{k}": v for k, v in validate.last.items()} if validate.last else {})}


def close(run: Run) -> None:
    """Wait for the pending save (SaveFailed if the disk refused it), close the checkpointer and loggers
    (once: a second call does nothing)."""
    if run.checkpointer.closed:
        return
    try:
        run.checkpointer.wait()
    finally:
        run.checkpointer.close()
        run.logger.close()


def finish_run(cfg: Config, run_dir: Path, graphdef, host_params, tokenizer, val_set) -> None:
    """Write loss.png and print (and save) the family's sample from the trained model, whose
    weights `host_params` are numpy arrays on this host (none: no sample)."""
    from lmjax.train.plots import plot_loss_curves

    plot_loss_curves(read_metrics(run_dir), run_dir / "loss.png")
    loggers.console(f"loss curve: {run_dir / 'loss.png'}")
    sample = family_of(cfg.model).sample
    if host_params is None or sample is None:
        return
    text = sample(nnx.merge(graphdef, host_params), cfg, tokenizer, val_set)
    (run_dir / "sample.txt").write_text(text)
    loggers.console("sample:\n" + text)
