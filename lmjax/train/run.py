"""Setting a training run up: its data, its run directory and the compiled step, held in a `Run`.

`setup(cfg, run_dir)` goes through five phases: check the inputs (everything user input can
fail, before anything compiles), open the run directory or resume its newest checkpoint, build
(or restore) the sharded train state, write the run's files, compile the train step ahead of
time. The step loop (`lmjax.train.loop`) then only steps and calls hooks. The weight transforms
(`lmjax.train.transforms`: LoRA, QAT) are given by the caller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lmjax.axis_rules import pipeline_schedule
from lmjax.checkpoint import Checkpointer
from lmjax.config import Config, ConfigError
from lmjax.data import BatchIterator, save_to_run
from lmjax.files import write_json_atomically
from lmjax.parallel import batch_sharding, global_batch, local_batch_rows, make_mesh, validate_layout
from lmjax.scaling.counting import total_steps
from lmjax.train import loggers
from lmjax.train.datasets import DATA_ORDER_VERSION, check_data_order, load_datasets
from lmjax.train.guard import BadStepRule
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.restore import restore_trained_onto
from lmjax.train.resume import (
    add_missing_router_biases,
    check_init_from,
    check_init_tokenizer,
    check_resumable,
    check_same_tokenizer,
    restore_resumable,
    run_tokenizer,
)
from lmjax.train.state import TrainState, abstract_model, abstract_train_state, init_train_state
from lmjax.train.step import make_train_step
from lmjax.train.transforms import WeightTransform, adapter_of, check_transforms
from lmjax.xla_setup import enable_compilation_cache


@dataclass
class Run:
    """One training run, set up: what the step loop, its hooks and `finish` share.

    `state` and `step` advance as the loop trains; everything else is fixed by `setup`.
    `train_step(state, batch) -> (state, metrics, routing)` is compiled for global batches
    of `cfg.train.batch_size` rows; `next_batch()` gives this process's next one.
    """

    cfg: Config
    run_dir: Path
    mesh: Mesh
    rows: NamedSharding  # the batch sharding: rows over the data-parallel axes
    tokenizer: object
    train_set: object
    val_set: object
    batches: BatchIterator
    checkpointer: Checkpointer
    logger: loggers.MetricsLogger
    graphdef: object
    train_step: object
    state: TrainState
    step: int
    steps: int  # the run's length
    halt: int  # where this invocation stops: steps, or train.halt_at_step
    resuming: bool
    compile_seconds: float
    main_process: bool
    frozen: nnx.State | None = None  # an adapting run's frozen model weights, which `state.params` adapt
    transforms: tuple[WeightTransform, ...] = ()

    def data_state(self) -> dict:
        """The data iterator's position, and how examples are built (DATA_ORDER_VERSION)."""
        return {**self.batches.state(), "data_order": DATA_ORDER_VERSION}

    def next_batch(self) -> dict:
        """The next global batch: this process's rows, assembled into sharded jax.Arrays."""
        return global_batch(next(self.batches), self.rows, self.cfg.train.batch_size)

    def model_params(self) -> nnx.State:
        """The model's current weights: `state.params`, or for an adapting run (LoRA) the
        frozen weights with the trained ones folded in."""
        if self.frozen is None:
            return self.state.params
        return adapter_of(self.transforms).fold(self.frozen, self.state.params)


@dataclass
class Inputs:
    """What `check_inputs` read and checked: the completed config, the mesh, the run's length,
    the run whose weights it starts from (`--init-from`, or the frozen run an adapter adapts),
    the data and the tokenizer."""

    cfg: Config
    mesh: Mesh
    steps: int
    start: Path | None
    train_set: object
    val_set: object
    tokenizer: object


@dataclass
class Opened:
    """The run directory, opened: its checkpointer, whether it resumes, and then the
    checkpoint's config (`saved`) and the settings changed since (`changes`)."""

    run_dir: Path
    checkpointer: Checkpointer
    resuming: bool
    saved: dict | None = None
    changes: dict | None = None


def setup(cfg: Config, run_dir: Path, init_from: Path | None = None, new_data_order: bool = False,
          transforms: tuple[WeightTransform, ...] = (), restore_weights: Callable | None = None) -> Run:
    """Start the run in `run_dir` or, when it holds checkpoints, restore its newest one (see the
    module docstring for the phases). A new run with `init_from` (a run directory) starts from
    that run's newest weights, with a fresh optimizer at step 0; with an adapting transform
    (LoRA) those weights stay frozen and only the adapter's train (`lora.base` records the
    run). `restore_weights(run_dir, mesh) -> params` reads them (default: a run that trained
    the model's own weights; `lmjax.runs` reads any kind). Resuming checks the settings against
    the checkpoint's (`check_resumable`; `new_data_order` accepts a changed batch or data) and
    appends the changes to config_history.jsonl; config.json is rewritten only once the restore
    succeeded. Raises ConfigError or DataError before compiling."""
    run_dir = Path(run_dir)
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    inputs = check_inputs(cfg, run_dir, init_from, transforms)
    cfg, mesh = inputs.cfg, inputs.mesh
    opened = open_or_resume(cfg, run_dir, inputs.tokenizer, new_data_order)
    restore_weights = restore_weights or (lambda path, mesh: restore_trained_onto(path, mesh)[2])
    graphdef, state, shardings, optimizer, frozen, data_state = build_state(inputs, opened, transforms,
                                                                            restore_weights)
    batches = BatchIterator(inputs.train_set, cfg.train.batch_size, cfg.data.seed, step=int(state.step),
                            rows=local_batch_rows(mesh, cfg.train.batch_size), workers=cfg.data.workers)
    if opened.resuming and not new_data_order:
        batches.restore(data_state)  # also checks data.seed and the mixture weights against the checkpoint's
    main_process = jax.process_index() == 0
    if main_process:
        write_files(cfg, run_dir, inputs.tokenizer, int(state.step), opened.changes)
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, inputs.steps),
                              cfg.optim.grad_accum_steps, cfg.model.dropout > 0 or cfg.model.moe.router_jitter > 0,
                              cfg.model.moe, transforms, BadStepRule.from_config(cfg.train))
    compile_start = time.perf_counter()
    train_step = compile_step(step_fn, cfg, mesh, inputs.train_set, state, shardings, frozen)
    return Run(cfg=cfg, run_dir=run_dir, mesh=mesh, rows=batch_sharding(mesh), tokenizer=inputs.tokenizer,
               train_set=inputs.train_set, val_set=inputs.val_set, batches=batches, checkpointer=opened.checkpointer,
               logger=loggers.MetricsLogger(cfg, run_dir, opened.resuming, main_process, start_step=int(state.step)),
               graphdef=graphdef, train_step=train_step, state=state, step=int(state.step), steps=inputs.steps,
               halt=min(inputs.steps, cfg.train.halt_at_step or inputs.steps), resuming=opened.resuming,
               compile_seconds=time.perf_counter() - compile_start, main_process=main_process, frozen=frozen,
               transforms=transforms)


def check_inputs(cfg: Config, run_dir: Path, init_from: Path | None, transforms: tuple) -> Inputs:
    """Phase 1: every check of user input that needs no checkpoint of `run_dir`: the mesh, the
    transforms (which may complete `cfg`), the weights to start from (shapes and tokenizer), the
    data and the sample prompt. Raises ConfigError or DataError."""
    steps = total_steps(cfg)
    mesh = make_mesh(cfg.mesh)
    validate_layout(cfg, mesh)
    cfg = check_transforms(cfg, transforms, init_from)
    adapter = adapter_of(transforms)
    start = adapter.frozen_run(cfg) if adapter is not None else init_from
    if start is not None:
        check_init_from(cfg, Path(start))
    train_set, val_set, tokenizer = load_datasets(cfg, run_tokenizer(cfg, run_dir))
    if start is not None:
        check_init_tokenizer(tokenizer, Path(start))
    check_sample_prompt(cfg, tokenizer)
    return Inputs(cfg, mesh, steps, None if start is None else Path(start), train_set, val_set, tokenizer)


def open_or_resume(cfg: Config, run_dir: Path, tokenizer, new_data_order: bool) -> Opened:
    """Phase 2: open the checkpoints of `run_dir` (created if new) and, when it holds some,
    check that this config may resume them: an optimizer state to resume, the model and data
    order unchanged (unless `new_data_order`), the same tokenizer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
    if checkpointer.latest_step() is None:
        return Opened(run_dir, checkpointer, resuming=False)
    if not checkpointer.holds_optimizer_state():
        raise ConfigError(f"cannot resume {run_dir}: its checkpoint holds weights only (an imported model: no "
                          f"optimizer state or data position); train from them with --init-from {run_dir} "
                          "and a new run directory.")
    saved = checkpointer.saved_config()  # the settings the newest checkpoint was written with
    changes = check_resumable(cfg, saved, new_data_order)
    check_same_tokenizer(tokenizer, run_dir)
    if not new_data_order:
        check_data_order(cfg, checkpointer.restore_data())
    return Opened(run_dir, checkpointer, resuming=True, saved=saved, changes=changes)


def build_state(inputs: Inputs, opened: Opened, transforms: tuple, restore_weights: Callable):
    """Phase 3: the sharded train state, restored straight into its layout when resuming (nothing
    is initialised first), else initialised; a new run's weights from `inputs.start`, an
    adapting run's frozen weights from there every time. Returns (graphdef, state, shardings,
    optimizer, frozen weights or None, the checkpoint's data state or None)."""
    cfg, mesh = inputs.cfg, inputs.mesh

    def optimizer_for(params):
        return make_optimizer(cfg.optim, inputs.steps, params, cfg.model)

    data_state = None
    if opened.resuming:
        graphdef, abstract, optimizer = abstract_train_state(cfg.model, optimizer_for, mesh, transforms)
        state, data_state = restore_resumable(opened.checkpointer, abstract, opened.saved, cfg, opened.run_dir)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
    else:
        graphdef, state, shardings, optimizer = init_train_state(cfg.model, optimizer_for, cfg.train.seed, mesh,
                                                                 transforms)
    adapting, frozen = adapter_of(transforms) is not None, None
    if inputs.start is not None and (adapting or not opened.resuming):
        params = restore_weights(inputs.start, mesh)
        if not adapting:
            params = add_missing_router_biases(params, state.params)
        params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, abstract_model(cfg.model)[1])
        if adapting:
            frozen = params
        else:
            state = state._replace(params=params)
    return graphdef, state, shardings, optimizer, frozen, data_state


def write_files(cfg: Config, run_dir: Path, tokenizer, step: int, changes: dict | None) -> None:
    """Phase 4 (process 0, once the restore succeeded): config.json and environment.json,
    replaced atomically (others may read them), the tokenizer, and the settings changed on
    resume appended to config_history.jsonl."""
    write_json_atomically(run_dir / "config.json", cfg.to_dict())
    write_json_atomically(run_dir / "environment.json", loggers.environment())
    save_to_run(tokenizer, run_dir)
    if changes:
        with (run_dir / "config_history.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}) + "\n")


def compile_step(step_fn, cfg: Config, mesh: Mesh, train_set, state: TrainState, shardings, frozen):
    """Phase 5: `step_fn` compiled ahead of time for global batches of `train.batch_size` rows
    shaped like `train_set`'s examples, donating the state; an adapting run's `frozen` weights
    are bound as the last argument. Returns `train_step(state, batch)`."""
    rows = batch_sharding(mesh)
    batch_shape = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape), v.dtype, sharding=rows)
                   for k, v in train_set[0].items()}
    # activation sharding constraints and the pipeline schedule resolve against these while tracing
    with jax.set_mesh(mesh), pipeline_schedule(cfg.mesh.pipeline_microbatches, cfg.mesh.pipeline_repeats):
        compiled = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None, None)).lower(
            state, batch_shape, *([] if frozen is None else [frozen])).compile()
    return compiled if frozen is None else lambda state, batch: compiled(state, batch, frozen)


def check_sample_prompt(cfg: Config, tokenizer) -> None:
    """Raise ConfigError if train.sample_prompt leaves no room in model.max_seq_len for the
    sample drawn after training."""
    length = len(tokenizer.encode(cfg.train.sample_prompt))
    if cfg.train.sample_tokens and length >= cfg.model.max_seq_len:
        raise ConfigError(f"train.sample_prompt is {length} tokens, which leaves no room for the sample in "
                          f"model.max_seq_len={cfg.model.max_seq_len}; shorten it or set train.sample_tokens=0.")
