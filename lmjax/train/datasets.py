"""The datasets a run trains and validates on, and how their examples are built.

`load_datasets` reads `data.source` or prepared `data.path` directories (a mixture) into the
family's examples, held-out validation included; `DATA_ORDER_VERSION` is recorded with every
checkpoint, so a resume refuses a data order built otherwise (`check_data_order`).
"""

from __future__ import annotations

import math

from lmjax.config import Config, ConfigError
from lmjax.data import (
    Concat,
    DataError,
    Mixture,
    PackedDataset,
    Subset,
    load_documents,
    load_tokenizer,
    padded_vocab_size,
    split_documents,
)
from lmjax.families import family_of

# How examples are built from the data, recorded with every checkpoint. 2: a mixture's parts are
# wrapped in the family's objective one by one, so the mixture weights apply to examples.
DATA_ORDER_VERSION = 2


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


