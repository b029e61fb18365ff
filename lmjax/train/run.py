"""Setting a training run up: its data, its run directory and the compiled step, held in a `Run`.

`setup(cfg, run_dir)` does every check that user input can fail before anything compiles,
restores the newest checkpoint of `run_dir` when there is one, and compiles the train step
ahead of time. The step loop (`lmjax.train.loop`) then only steps and calls hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from lmjax.checkpoint import Checkpointer
from lmjax.config import Config, ConfigError
from lmjax.data import (
    BatchIterator,
    Concat,
    DataError,
    Mixture,
    PackedDataset,
    Subset,
    load_documents,
    load_tokenizer,
    padded_vocab_size,
    save_to_run,
    split_documents,
)
from lmjax.families import family_of
from lmjax.files import file_sha256, write_json_atomically
from lmjax.parallel import batch_sharding, global_batch, local_batch_rows, make_mesh, validate_layout
from lmjax.scaling.counting import total_steps
from lmjax.train import loggers
from lmjax.train.guard import BadStepRule
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.rollback import restore_train_state
from lmjax.train.state import TrainState, abstract_model, abstract_train_state, init_train_state
from lmjax.train.step import make_train_step
from lmjax.xla_setup import enable_compilation_cache

# How examples are built from the data, recorded with every checkpoint. 2: a mixture's parts are
# wrapped in the family's objective one by one, so the mixture weights apply to examples.
DATA_ORDER_VERSION = 2


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
    frozen: nnx.State | None = None  # a LoRA run's base weights, which `state.params` adapts

    def data_state(self) -> dict:
        """The data iterator's position, and how examples are built (DATA_ORDER_VERSION)."""
        return {**self.batches.state(), "data_order": DATA_ORDER_VERSION}

    def next_batch(self) -> dict:
        """The next global batch: this process's rows, assembled into sharded jax.Arrays."""
        return global_batch(next(self.batches), self.rows, self.cfg.train.batch_size)

    def model_params(self) -> nnx.State:
        """The model's current weights: `state.params`, or for a LoRA run the frozen base with
        the adapters folded in."""
        if self.frozen is None:
            return self.state.params
        from lmjax.lora import fold

        return fold(self.frozen, self.state.params, self.cfg.lora)


def setup(cfg: Config, run_dir: Path, init_from: Path | None = None, new_data_order: bool = False) -> Run:
    """Start the run in `run_dir` or, when it holds checkpoints, restore its newest one: check
    the inputs, load the data, write config.json, environment.json and the tokenizer, build
    (or restore) the sharded train state and compile the train step. A new run with
    `init_from` (a run directory) starts from that run's newest weights, with a fresh
    optimizer at step 0; with `lora.rank` > 0 those weights stay frozen and only adapters
    train (`lora.base` records the run). Resuming checks the settings against the checkpoint's (see
    `check_resumable`; `new_data_order` accepts a changed batch or data) and appends the
    changes to config_history.jsonl; config.json is rewritten only once the restore
    succeeded. Raises ConfigError or DataError before compiling."""
    run_dir = Path(run_dir)
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    steps = total_steps(cfg)
    mesh = make_mesh(cfg.mesh)
    validate_layout(cfg, mesh)
    if cfg.quant.weights != "none":
        from lmjax.quantize import check_quantization_aware

        check_quantization_aware(cfg)
    if cfg.lora.enabled:
        cfg = lora_base(cfg, init_from)
        init_from = None
    base = Path(init_from or cfg.lora.base) if init_from is not None or cfg.lora.enabled else None
    if base is not None:
        check_init_from(cfg, base)
    train_set, val_set, tokenizer = load_datasets(cfg, run_tokenizer(cfg, run_dir))
    if base is not None:  # a LoRA run's base too: its frozen weights read these ids
        check_init_tokenizer(tokenizer, base)
    check_sample_prompt(cfg, tokenizer)
    main_process = jax.process_index() == 0

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
    resuming = checkpointer.latest_step() is not None
    if resuming and not checkpointer.holds_optimizer_state():
        raise ConfigError(f"cannot resume {run_dir}: its checkpoint holds weights only (an imported model: no "
                          f"optimizer state or data position); train from them with --init-from {run_dir} "
                          "and a new run directory.")
    if resuming:
        saved = checkpointer.saved_config()  # the settings the newest checkpoint was written with
        changes = check_resumable(cfg, saved, new_data_order)
        check_same_tokenizer(tokenizer, run_dir)
        if not new_data_order:
            check_data_order(cfg, checkpointer.restore_data())

    def optimizer_for(params):
        return make_optimizer(cfg.optim, steps, params, cfg.model)

    if resuming:  # restore straight into the sharded layout; nothing is initialised first
        graphdef, abstract, optimizer = abstract_train_state(cfg.model, optimizer_for, mesh, cfg.lora, cfg.quant)
        try:
            state, data_state, _ = restore_train_state(checkpointer, abstract)
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ConfigError(f"cannot resume {run_dir}: the saved optimizer state has another structure; resume "
                              f"with the settings it was saved with ({_differences(saved['optim'], cfg, 'optim')})."
                              ) from None
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
    else:
        graphdef, state, shardings, optimizer = init_train_state(cfg.model, optimizer_for, cfg.train.seed, mesh,
                                                                 cfg.lora, cfg.quant)
    frozen = None
    if (init_from is not None and not resuming) or cfg.lora.enabled:
        from lmjax.train.run_eval import restore_weights_onto

        params = restore_weights_onto(Path(init_from or cfg.lora.base), mesh)[2]
        model_params = abstract_model(cfg.model)[1]
        params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, model_params)
        if cfg.lora.enabled:
            frozen = params
        else:
            state = state._replace(params=params)

    batches = BatchIterator(train_set, cfg.train.batch_size, cfg.data.seed, step=int(state.step),
                            rows=local_batch_rows(mesh, cfg.train.batch_size), workers=cfg.data.workers)
    if resuming and not new_data_order:
        batches.restore(data_state)  # also checks data.seed and the mixture weights against the checkpoint's
    if main_process:  # written only now that the restore succeeded; replaced atomically (others may read it)
        write_json_atomically(run_dir / "config.json", cfg.to_dict())
        write_json_atomically(run_dir / "environment.json", loggers.environment())
        save_to_run(tokenizer, run_dir)
        if resuming and changes:
            with (run_dir / "config_history.jsonl").open("a") as f:
                f.write(json.dumps({"step": int(state.step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "changes": changes}) + "\n")

    rows = batch_sharding(mesh)
    adapt = None
    if cfg.lora.enabled:
        from lmjax.lora import low_rank

        adapt = functools.partial(low_rank, cfg=cfg.lora)
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, steps),
                              cfg.optim.grad_accum_steps, cfg.model.dropout > 0 or cfg.model.moe.router_jitter > 0,
                              cfg.model.moe, adapt, BadStepRule.from_config(cfg.train))
    compile_start = time.perf_counter()
    batch_shape = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape), v.dtype, sharding=rows)
                   for k, v in train_set[0].items()}
    with jax.set_mesh(mesh):  # activation sharding constraints resolve against it while tracing
        compiled = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None, None)).lower(
            state, batch_shape, *([] if frozen is None else [frozen])).compile()
    train_step = compiled if frozen is None else lambda state, batch: compiled(state, batch, frozen)
    return Run(cfg=cfg, run_dir=run_dir, mesh=mesh, rows=rows, tokenizer=tokenizer, train_set=train_set,
               val_set=val_set, batches=batches, checkpointer=checkpointer,
               logger=loggers.MetricsLogger(cfg, run_dir, resuming, main_process, start_step=int(state.step)),
               graphdef=graphdef, train_step=train_step, state=state, step=int(state.step), steps=steps,
               halt=min(steps, cfg.train.halt_at_step or steps), resuming=resuming,
               compile_seconds=time.perf_counter() - compile_start, main_process=main_process, frozen=frozen)


def lora_base(cfg: Config, init_from: Path | None) -> Config:
    """`cfg` with `lora.base` set to `init_from` (absolute), the run whose weights the adapters
    adapt; ConfigError when there is neither, or when `lora.targets` does not fit the model."""
    from lmjax.lora import targeted

    if init_from is not None:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, base=str(Path(init_from).absolute())))
    if cfg.lora.base is None:
        raise ConfigError(f"lora.rank={cfg.lora.rank} adapts a trained model; give --init-from RUN_DIR.")
    targeted(cfg.lora, abstract_model(cfg.model)[1])
    return cfg


RUN_RECORDS = ("checkpoints", "metrics.jsonl", "routing.jsonl", "config_history.jsonl", "rollbacks.jsonl", "loss.png",
               "sample.txt")


def clear_run(run_dir: Path) -> None:
    """Delete what a run left in `run_dir` (its checkpoints and records, RUN_RECORDS) so that
    training starts over there (`lmjax train --fresh`). Process 0 deletes; every process
    waits for it."""
    if jax.process_index() == 0:
        for path in (Path(run_dir) / name for name in RUN_RECORDS):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        loggers.console(f"--fresh: deleted the checkpoints and records in {run_dir}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lmjax clear_run")


def load_datasets(cfg: Config, tokenizer=None) -> tuple[PackedDataset | Mixture, PackedDataset | Concat, object]:
    """(train, validation, tokenizer) or a DataError / ConfigError, before anything compiles.

    With `data.path` (prepared data, a Mixture when several directories are given) the
    last `data.val_fraction` of each dataset's windows is held out for validation;
    otherwise `data.source` is read and split by documents. `tokenizer` defaults to
    `data.tokenizer`; pass a run's saved copy to reload a run."""
    from lmjax.data.prepare import open_prepared

    tokenizer = load_tokenizer(cfg.data.tokenizer) if tokenizer is None else tokenizer
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; set model.vocab_size={padded_vocab_size(tokenizer.vocab_size)} "
                          "(padded to a multiple of 128).")
    window = family_of(cfg.model).window_length(cfg)  # raw tokens per example (span corruption draws more)
    if cfg.data.path is None:
        documents = load_documents(cfg.data.source, cfg.data.text_field, cfg.data.max_bytes)
        train_stream, val_stream = split_documents(documents, tokenizer, cfg.data.val_fraction, cfg.data.seed)
        train_set, val_set = PackedDataset(train_stream, window), PackedDataset(val_stream, window)
    else:
        parts, tails, weights = [], [], []
        for directory, weight in cfg.data.mixture():
            windows = open_prepared(directory, tokenizer, window, verify=cfg.data.verify_shards)
            held_out = max(1, math.ceil(cfg.data.val_fraction * len(windows)))
            if held_out >= len(windows):
                raise DataError(f"data.path {directory} has {len(windows)} windows of data.seq_len="
                                f"{cfg.data.seq_len}, too few to hold out validation; prepare more data.")
            parts.append(Subset(windows, 0, len(windows) - held_out))
            tails.append(Subset(windows, len(windows) - held_out, len(windows)))
            weights.append(weight)
        train_set = parts[0] if len(parts) == 1 else Mixture(parts, weights)
        val_set = tails[0] if len(tails) == 1 else Concat(tails)
    train_set, val_set = family_examples(train_set, cfg, tokenizer, cfg.data.seed), family_examples(
        val_set, cfg, tokenizer, cfg.data.seed + 1)
    if len(val_set) < cfg.train.batch_size:
        raise DataError(f"the validation split has {len(val_set)} sequences of data.seq_len={cfg.data.seq_len}, "
                        f"fewer than train.batch_size={cfg.train.batch_size}; raise data.val_fraction or use more "
                        "data.")
    return train_set, val_set, tokenizer


def family_examples(windows, cfg: Config, tokenizer, seed: int):
    """The examples of the family's objective over raw `windows` (a dataset or a Mixture): a
    Mixture's parts are wrapped one by one, so that its weights still apply to examples."""
    examples = family_of(cfg.model).examples
    if examples is None:
        return windows
    if isinstance(windows, Mixture):
        return windows.map(lambda part: examples(part, cfg, tokenizer, seed))
    return examples(windows, cfg, tokenizer, seed)


def check_data_order(cfg: Config, data_state: dict) -> None:
    """Raise ConfigError if the checkpoint's data order was built otherwise than now: before
    DATA_ORDER_VERSION 2 a mixture was wrapped whole in the family's objective, so its
    weights were ignored and resuming would draw other examples."""
    saved = data_state.get("data_order", 1)
    if saved < DATA_ORDER_VERSION and family_of(cfg.model).examples is not None and len(cfg.data.mixture()) > 1:
        raise ConfigError(f"cannot resume: this {cfg.model.family} run on a data.path mixture was saved with data "
                          f"order version {saved}, which ignored the mixture weights; its data order would change: "
                          "start a new run, or accept a new data order with --new-data-order.")


def check_sample_prompt(cfg: Config, tokenizer) -> None:
    """Raise ConfigError if train.sample_prompt leaves no room in model.max_seq_len for the
    sample drawn after training."""
    length = len(tokenizer.encode(cfg.train.sample_prompt))
    if cfg.train.sample_tokens and length >= cfg.model.max_seq_len:
        raise ConfigError(f"train.sample_prompt is {length} tokens, which leaves no room for the sample in "
                          f"model.max_seq_len={cfg.model.max_seq_len}; shorten it or set train.sample_tokens=0.")


# settings that decide which examples each step trains on: changing them on resume breaks
# exact data continuation (the family's objective settings are among them)
DATA_ORDER_SETTINGS = ("train.batch_size", "data.source", "data.text_field", "data.max_bytes", "data.path",
                       "data.seq_len", "data.mlm_probability", "data.noise_density", "data.mean_noise_span_length",
                       "data.val_fraction", "data.seed")


def check_resumable(cfg: Config, saved: dict, new_data_order: bool = False) -> dict:
    """The settings of `cfg` that differ from `saved` (the checkpoint's config), as
    {"section.field": [saved, now]}. Raise ConfigError if the model differs, or if a
    setting of DATA_ORDER_SETTINGS does unless `new_data_order`."""
    now = _flatten(cfg.to_dict())
    before = _flatten(saved)
    changes = {k: [before[k], v] for k, v in now.items() if k in before and before[k] != v and k != "train.run_dir"}
    model = [k for k in changes if k.startswith(("model.", "lora."))]
    if model:
        raise ConfigError("cannot resume: the model shape or its LoRA adapters differ from the saved run ("
                          + "; ".join(f"{k}: saved {changes[k][0]!r}, now {changes[k][1]!r}" for k in model) + ").")
    data = [k for k in changes if k in DATA_ORDER_SETTINGS]
    if data and not new_data_order:
        raise ConfigError("cannot resume with " + ", ".join(f"{k}={changes[k][1]!r} (saved {changes[k][0]!r})"
                                                            for k in data)
                          + ": the data order would not continue exactly; resume with the saved values, or accept "
                          "a new data order with --new-data-order.")
    return changes


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _differences(saved_section: dict, cfg: Config, section: str) -> str:
    now = cfg.to_dict()[section]
    changed = [f"{section}.{k}={v!r}, now {now[k]!r}" for k, v in saved_section.items() if now.get(k) != v]
    return "; ".join(changed) or "no setting differs"


def check_init_from(cfg: Config, init_from: Path) -> None:
    """Raise ConfigError unless the run `init_from` has weights shaped like those of `cfg.model`."""
    from lmjax.train.run_eval import load_config

    _, mine = abstract_model(cfg.model)
    _, theirs = abstract_model(load_config(init_from).model)
    mine, theirs = (dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(s))[0]) for s in (mine, theirs))
    differences = [f"{jax.tree_util.keystr(k)} {theirs[k].shape if k in theirs else 'absent'} vs {v.shape}"
                   for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
    differences += [f"{jax.tree_util.keystr(k)} only in {init_from}" for k in theirs if k not in mine]
    if differences:
        raise ConfigError(f"--init-from {init_from}: its weights do not fit experiment {cfg.name!r} (saved vs now: "
                          + "; ".join(differences[:3]) + "); give a run of the same model shape.")


def _saved_tokenizers(run_dir: Path) -> list[Path]:
    """The tokenizer file a run saved (none for the byte tokenizer)."""
    return [p for p in (run_dir / "tokenizer.json", run_dir / "tokenizer.model") if p.is_file()]


def run_tokenizer(cfg: Config, run_dir: Path):
    """`data.tokenizer`, or the run's saved copy when resuming after the original file is gone."""
    spec = cfg.data.tokenizer
    saved = _saved_tokenizers(run_dir)
    if spec != "bytes" and not Path(spec).expanduser().is_file() and saved:
        return load_tokenizer(str(saved[0]))
    return load_tokenizer(spec)


def _run_tokenizer_if_other(tokenizer, run_dir: Path) -> str | None:
    """The tokenizer the run in `run_dir` saved ('bytes' or its file) when it is not `tokenizer`."""
    saved = _saved_tokenizers(run_dir)
    if (saved and file_sha256(saved[0]) != tokenizer.sha256) or (not saved and tokenizer.path is not None):
        return str(saved[0]) if saved else "bytes"
    return None


def check_init_tokenizer(tokenizer, init_from: Path) -> None:
    """Raise ConfigError unless `tokenizer` is the one the run `init_from` saved (its ids
    mean the same tokens)."""
    other = _run_tokenizer_if_other(tokenizer, init_from)
    if other is not None:
        raise ConfigError(f"--init-from {init_from}: data.tokenizer={tokenizer.name!r} is not that run's tokenizer; "
                          f"set data.tokenizer={other}.")


def check_same_tokenizer(tokenizer, run_dir: Path) -> None:
    """Raise ConfigError if the run being resumed saved a different tokenizer."""
    other = _run_tokenizer_if_other(tokenizer, run_dir)
    if other is not None:
        raise ConfigError(f"cannot resume: data.tokenizer={tokenizer.name!r} is not the tokenizer the run in "
                          f"{run_dir} was trained with; use {other}.")
