"""Run directories: read one back whatever kind of run wrote it, and evaluate it.

A run directory is one of the kinds in `RUN_KINDS`, each restored by its own function from
this one table: a run that trained the model's weights (or a weights-only import, `lmjax
convert from-hf`, `lmjax lora merge`), a LoRA run (its adapters folded into its base run's
weights, whatever kind that run is) and a quantized run (`lmjax quantize`). `train` is the
trainer with the weight transforms a config turns on and this restore for `--init-from`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmjax.adapters import weight_transforms
from lmjax.adapters.int8 import is_quantized, restore_quantized_onto
from lmjax.adapters.lora import fold
from lmjax.config import Config, ConfigError, MeshConfig
from lmjax.config_parse import override
from lmjax.data import DataError, PackedDataset, load_documents, load_from_run, tokenize
from lmjax.families import family_of
from lmjax.parallel import batch_sharding, make_mesh
from lmjax.train.datasets import family_examples, load_datasets
from lmjax.train.evaluate import evaluate
from lmjax.train.restore import load_config, restore_trained_onto


def _trained(run_dir: Path, mesh, step: int | None, keep_int8: bool):
    cfg = load_config(run_dir)
    return restore_trained_onto(run_dir, mesh, step, weight_transforms(cfg))


def _lora(run_dir: Path, mesh, step: int | None, keep_int8: bool):
    """A LoRA run saves its adapters alone: they are folded into its base run's newest weights."""
    cfg, graphdef, adapters, step = _trained(run_dir, mesh, step, keep_int8)
    base = restore_weights_onto(Path(cfg.lora.base), mesh)[2]
    return cfg, graphdef, fold(base, adapters, cfg.lora), step


def _quantized(run_dir: Path, mesh, step: int | None, keep_int8: bool):
    return restore_quantized_onto(run_dir, mesh, keep_int8)


# kind -> (is `run_dir` of this kind?, restore(run_dir, mesh, step, keep_int8) -> (cfg, graphdef, params, step));
# the first kind that matches is the run's
RUN_KINDS = {
    "quantized": (lambda run_dir: is_quantized(run_dir), _quantized),
    "lora": (lambda run_dir: load_config(run_dir).lora.enabled, _lora),
    "trained": (lambda run_dir: True, _trained),
}


def run_kind(run_dir: Path) -> str:
    """The kind of run (a key of RUN_KINDS) that wrote `run_dir`."""
    return next(kind for kind, (holds, _) in RUN_KINDS.items() if holds(Path(run_dir)))


def restore_weights_onto(run_dir: Path, mesh, step: int | None = None, keep_int8: bool = False):
    """(config, graphdef, params, step): the model weights of checkpoint `step` (default:
    newest) of `run_dir`, any kind of run, sharded over `mesh` by their logical axes; the
    optimizer state is not read. A quantized run's matrices stay `Int8Weight`s with
    `keep_int8` (for running the model), else they are dequantized (for code that changes or
    exports weights)."""
    return RUN_KINDS[run_kind(run_dir)][1](Path(run_dir), mesh, step, keep_int8)


def restore_weights(run_dir: Path, step: int | None = None, mesh_overrides: list[str] = (), keep_int8: bool = False):
    """(config, graphdef, params, step, mesh): `restore_weights_onto` a mesh over this
    process's devices: `mesh.data=-1` (all devices data parallel) unless `mesh_overrides` such
    as ["fsdp=4", "tensor=2"] say otherwise, whatever mesh wrote it."""
    mesh_cfg = override(Config(), [f"mesh.{o}" for o in mesh_overrides]).mesh if mesh_overrides else MeshConfig()
    mesh = make_mesh(mesh_cfg)
    return (*restore_weights_onto(run_dir, mesh, step, keep_int8), mesh)


def restore_params(run_dir: Path, step: int | None = None, mesh_overrides: list[str] = ()):
    """The model weights (nnx.State) of a checkpoint; see `restore_weights`."""
    return restore_weights(run_dir, step, mesh_overrides)[2]


def load(run_dir: Path | str, step: int | None = None):
    """(model, config, tokenizer) of a run's checkpoint (default: newest), with weights on
    this process's devices (replicated), whatever mesh trained it; a quantized run's matrices
    stay int8 (`Int8Weight`); tokenizer is None for a run imported without one
    (data.tokenizer='none'). For notebooks:

        model, cfg, tokenizer = lmjax.load("runs/decoder_tiny-20261122-142445")
    """
    from flax import nnx

    cfg, graphdef, params, _, _ = restore_weights(Path(run_dir), step, keep_int8=True)
    tokenizer = None if cfg.data.tokenizer == "none" else load_from_run(Path(run_dir), cfg.data.tokenizer)
    return nnx.merge(graphdef, params), cfg, tokenizer


def prepared_examples(cfg: Config, run_dir: Path, directory: Path):
    """(the family's examples over every window of the prepared `directory`, its tokenizer):
    the run's own tokenizer, which must be the one the data were prepared with, or for a run
    without one (data.tokenizer='none') the data's, whose ids must fit model.vocab_size."""
    from lmjax.data.prepare import open_prepared, prepared_tokenizer

    if cfg.data.tokenizer == "none":
        tokenizer = prepared_tokenizer(directory)
    else:
        tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"{directory} was prepared with a tokenizer of {tokenizer.vocab_size} ids, more than "
                          f"the run's model.vocab_size={cfg.model.vocab_size}; prepare it with the model's tokenizer.")
    windows = open_prepared(directory, tokenizer, family_of(cfg.model).window_length(cfg))
    return family_examples(windows, cfg, tokenizer, cfg.data.seed + 1), tokenizer


def evaluate_run(run_dir: Path, max_batches: int | None = None, data_source: str | None = None,
                 token_losses_file: Path | None = None) -> dict:
    """{step, loss, perplexity, bits_per_byte, tokens} of the newest checkpoint on the run's
    validation split, or on all of `data_source` (any `data.source`: "stdlib", a file, a
    directory, an HF dataset on disk). With `token_losses_file`, every position's loss is
    saved there (.npy, (sequences, seq_len) float32, nats, 0 where not counted). A directory
    made by `lmjax data prepare` is read as its token shards, which is how a run without a
    tokenizer (data.tokenizer='none') is evaluated."""
    from lmjax.data.prepare import is_prepared

    cfg, graphdef, params, step, mesh = restore_weights(run_dir, keep_int8=True)
    if data_source is not None and is_prepared(data_source):
        dataset, tokenizer = prepared_examples(cfg, run_dir, Path(data_source))
    else:
        tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
        if data_source is None:
            _, dataset, tokenizer = load_datasets(cfg, tokenizer)
        else:
            documents = load_documents(data_source, cfg.data.text_field, cfg.data.max_bytes)
            windows = PackedDataset(tokenize(documents, tokenizer), family_of(cfg.model).window_length(cfg))
            dataset = family_examples(windows, cfg, tokenizer, cfg.data.seed + 1)
    if data_source is not None and len(dataset) < cfg.train.batch_size:
        raise DataError(f"{data_source} holds {len(dataset)} sequences of data.seq_len={cfg.data.seq_len}, "
                        f"fewer than one batch of train.batch_size={cfg.train.batch_size}.")
    result = evaluate(graphdef, params, dataset, tokenizer, cfg.train.batch_size, max_batches,
                      batch_sharding(mesh), keep_token_losses=token_losses_file is not None)
    if token_losses_file is not None:
        np.save(token_losses_file, result.pop("token_losses"))
        result["token_losses_file"] = str(token_losses_file)
    return {"step": step, **result}


def train(cfg: Config, run_dir: Path, init_from: Path | None = None, new_data_order: bool = False) -> dict:
    """`lmjax.train.loop.train` with the weight transforms `cfg` turns on (LoRA, QAT) and
    `--init-from` (or a LoRA run's base) read from any kind of run (`restore_weights_onto`)."""
    from lmjax.train.loop import train as train_loop

    return train_loop(cfg, run_dir, init_from, new_data_order, weight_transforms(cfg),
                      lambda path, mesh: restore_weights_onto(path, mesh)[2])
