"""Validation metrics: loss, perplexity and bits per byte over held-out sequences."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from lmjax.data import PackedDataset, eval_batches
from lmjax.parallel import global_batch, local_batch_rows, natural_order
from lmjax.train.step import eval_step

_eval_step = jax.jit(eval_step, static_argnums=0)


def evaluate(graphdef, params, dataset: PackedDataset, tokenizer, batch_size: int, max_batches: int | None,
             rows: NamedSharding, keep_token_losses: bool = False) -> dict:
    """Mean next-token loss (nats/token), perplexity = exp(loss), and bits per byte =
    total loss / ln 2 / UTF-8 bytes of the predicted tokens, over the first
    `max_batches` batches of `dataset` (all when None). With `keep_token_losses`, also
    "token_losses": (sequences, T) float32 numpy array of every position's loss (0 where
    masked), gathered from all processes."""
    token_bytes = jnp.asarray(tokenizer.token_byte_lengths(), jnp.float32)
    loss_sum = count = byte_count = 0.0
    kept = []
    for batch in eval_batches(dataset, batch_size, max_batches):
        size = len(next(iter(batch.values())))  # batch_size, or fewer when the dataset is smaller
        local_rows = local_batch_rows(rows.mesh, size)
        batch = global_batch({k: v[local_rows] for k, v in batch.items()}, rows, size)
        with jax.set_mesh(rows.mesh):
            sums = _eval_step(graphdef, params, batch, token_bytes)
        if keep_token_losses:
            kept.append(natural_order(multihost_utils.process_allgather(sums[3], tiled=True), rows.mesh))
        sums = jax.device_get(sums[:3])
        loss_sum, count, byte_count = loss_sum + float(sums[0]), count + float(sums[1]), byte_count + float(sums[2])
    loss = loss_sum / max(count, 1.0)
    result = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1.0),
        "tokens": count,
    }
    if keep_token_losses:
        result["token_losses"] = np.concatenate(kept)
    return result
