"""The output head's loss, a chunk of positions at a time, so that all the logits never exist at once.

A batch's float32 logits take rows x positions x vocabulary x 4 bytes: 8 GiB for 8 rows of
8192 positions over a 32k vocabulary, more than the rest of a small model's activations.
`chunked_token_losses` projects a chunk of positions to the vocabulary, takes its cross-entropy
and keeps only the per-token losses; `jax.checkpoint` around the scanned chunk makes the
backward pass recompute that chunk's logits instead of saving them (the idea of MaxText's
vocabulary tiling and Levanter's blockwise cross-entropy, written here for lmjax's head). The
cost: the output matmul runs once more in the backward pass.

`model.loss_chunk` sets the positions per chunk (every row of the batch at once): 0 takes the
whole sequence at once, and None (the default) picks by size: no chunking while the logits of
the whole (micro-)batch fit `LOGITS_CHUNK_BYTES` on one device, else the largest divisor of the
sequence length whose chunk fits it (`chunk_positions`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lmjax.axis_rules import mesh_axes

LOGITS_CHUNK_BYTES = 128 * 2**20  # the float32 logits one device holds at a time when model.loss_chunk is None


def cross_entropy(logits, targets):
    """Cross-entropy (nats) of each position: logits (..., V) float32, targets (...) int -> (...) float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def logits_bytes_per_position(rows: int, vocab: int) -> float:
    """Bytes of one position's float32 logits over `rows` rows on one device: rows x vocab x 4,
    divided by the devices that split the batch and vocabulary axes under the current mesh
    (`jax.set_mesh`; outside one, a single device holds them all)."""
    mesh = jax.sharding.get_abstract_mesh()
    split = 1 if mesh.empty else math.prod(
        mesh.shape[a] for axes in mesh_axes(("batch", "activation_length", "vocab"), mesh) for a in axes)
    return rows * vocab * 4 / split


def chunk_positions(setting: int | None, length: int, bytes_per_position: float) -> int:
    """Positions per chunk of sequences of `length` under `model.loss_chunk` = `setting`: the
    setting itself when positive, `length` (one chunk) when 0, and when None the largest
    divisor of `length` whose chunk's logits (`bytes_per_position` each) fit `LOGITS_CHUNK_BYTES`
    (so `length` itself whenever the whole fits; at least 1)."""
    if setting is not None:
        return setting or length
    fitting = [c for c in range(1, length + 1) if length % c == 0 and c * bytes_per_position <= LOGITS_CHUNK_BYTES]
    return max(fitting, default=1)


def chunked_token_losses(features, targets, loss_mask, project, chunk: int):
    """Per-token cross-entropy (B, T) float32 (nats, 0 where loss_mask is 0) of the logits
    `project(features)`, computed `chunk` positions at a time.

    features (B, T, F) what the output projection reads; targets (B, T) int; loss_mask (B, T)
    float; `project` maps (B, c, F) to logits (B, c, V) float32 (it closes over the head's
    weights, whose gradients the scan accumulates). Chunk k holds positions k, k + T/c, ...
    (strided), so that a sequence axis split across devices in contiguous blocks keeps every
    device busy in every chunk. Raises ValueError when `chunk` does not divide T.
    """
    b, t = targets.shape
    if chunk >= t:
        return cross_entropy(project(features), targets) * loss_mask
    if t % chunk:
        raise ValueError(f"model.loss_chunk={chunk} does not divide the {t} target positions; pick a divisor.")
    n = t // chunk

    def split(a):  # (B, T, ...) -> (T/c, B, c, ...): chunk k is positions k, k + T/c, ...
        return jnp.moveaxis(a.reshape(b, chunk, n, *a.shape[2:]), 2, 0)

    @jax.checkpoint  # keep only the chunk's inputs; its logits are recomputed in the backward pass
    def one_chunk(carry, chunk_inputs):
        h, y = chunk_inputs
        return carry, cross_entropy(project(h), y)

    _, losses = jax.lax.scan(one_chunk, None, (split(features), split(targets)))  # (T/c, B, c)
    return jnp.moveaxis(losses, 0, 2).reshape(b, t) * loss_mask
