"""Checks that a run may start from, or continue, what is on disk, and `--fresh`.

Resuming checks the settings against the checkpoint's (`check_resumable`) and the tokenizer
against the run's saved one; starting from another run's weights (`--init-from`, a LoRA run's
base) checks their shapes and tokenizer (`check_init_from`, `check_init_tokenizer`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
from flax import nnx
from jax.experimental import multihost_utils

from lmjax.config import Config, ConfigError
from lmjax.data import load_tokenizer
from lmjax.files import file_sha256
from lmjax.models.moe import RouterBias
from lmjax.train import loggers
from lmjax.train.restore import load_config
from lmjax.train.rollback import restore_train_state
from lmjax.train.state import abstract_model

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
    """Raise ConfigError unless the run `init_from` has weights shaped like those of `cfg.model`.
    A MoE router's selection bias that `init_from` lacks (a run without one) is allowed: it
    starts at zeros (`add_missing_router_biases`)."""
    _, mine = abstract_model(cfg.model)
    _, theirs = abstract_model(load_config(init_from).model)
    new_biases = {path for path, v in jax.tree_util.tree_flatten_with_path(mine, is_leaf=_is_variable)[0]
                  if isinstance(v, RouterBias)}
    mine, theirs = (dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(s))[0]) for s in (mine, theirs))
    differences = [f"{jax.tree_util.keystr(k)} {theirs[k].shape if k in theirs else 'absent'} vs {v.shape}"
                   for k, v in mine.items()
                   if (k not in theirs and k not in new_biases) or (k in theirs and theirs[k].shape != v.shape)]
    differences += [f"{jax.tree_util.keystr(k)} only in {init_from}" for k in theirs if k not in mine]
    if differences:
        raise ConfigError(f"--init-from {init_from}: its weights do not fit experiment {cfg.name!r} (saved vs now: "
                          + "; ".join(differences[:3]) + "); give a run of the same model shape.")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def add_missing_router_biases(params: nnx.State, fresh: nnx.State) -> nnx.State:
    """`params` (restored from `--init-from`) completed by the MoE selection biases
    (`RouterBias`) of `fresh` (the new run's initialised state: zeros) that it lacks, because
    the run it came from had none (a softmax router without `bias_update_rate`). Biases it
    has are kept."""
    return nnx.merge_state(nnx.filter_state(fresh, RouterBias), params)


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


def restore_resumable(checkpointer, abstract, saved: dict, cfg: Config, run_dir: Path):
    """(state, data_state) of the newest checkpoint, straight into the sharded layout of
    `abstract` (`lmjax.train.rollback.restore_train_state`); ConfigError when its optimizer
    state has another structure than `cfg.optim`'s."""
    try:
        state, data_state, _ = restore_train_state(checkpointer, abstract)
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        raise ConfigError(f"cannot resume {run_dir}: the saved optimizer state has another structure; resume "
                          f"with the settings it was saved with ({_differences(saved['optim'], cfg, 'optim')})."
                          ) from None
    return state, data_state
