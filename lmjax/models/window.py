"""Sliding-window attention, masked by positions (`model.sliding_window` W).

A query at position q sees the keys at positions k with q - W < k <= q (transformers' Mistral
convention, `kv_idx > q_idx - sliding_window`), within its own segment. The mask compares
positions, never array indices, so packed rows (positions restart per document) and cached
decoding (slots are not positions) are windowed alike; JAX's `local_window_size` counts
indices and would be wrong for both.

While decoding, a windowed layer keeps a ring buffer of R = min(W, cache length) slots per row:
position p lives in slot p % R, and `RingCache` holds which position each slot holds (-1: none).
A call attends over the ring's live slots followed by its own new keys, then writes the newest
valid key of each slot into the ring. Decode memory stays R slots, whatever the length decoded.
Positions must grow from call to call (as `lmjax.generate` decodes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmjax.models.kernels import AttentionMask

SLIDING_WINDOW_OBSTACLE = "a sliding window (cuDNN's local_window_size counts array indices, not positions)"


def in_window(query_positions, key_positions, window: int):
    """(B, 1, T, S) bool: key position k is in the window of query position q, q - W < k <= q;
    query_positions (B, T), key_positions (B, S) int."""
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    return ((k <= q) & (k > q - window))[:, None]


def windowed(mask, positions, window: int) -> AttentionMask:
    """Self-attention `mask` (an AttentionMask or a (B, 1, T, T) bool array) limited to the last
    `window` positions of each query; positions (B, T) are the queries' and the keys'."""
    mask = AttentionMask.of(mask)
    return dataclasses.replace(mask, dense=mask.dense & in_window(positions, positions, window),
                               not_fusable=mask.not_fusable or SLIDING_WINDOW_OBSTACLE)


@dataclasses.dataclass(frozen=True)
class RingWrite:
    """Which of a call's T new keys each of the R ring slots takes: `source` (B, R) int32 index
    into the call's tokens, `take` (B, R) bool (False: the slot keeps its key)."""

    source: jax.Array
    take: jax.Array

    def attend_and_write(self, ring, keys, values):
        """ring (ring_keys, ring_values), each (B, R, K, H); keys, values (B, T, K, H) of this call ->
        (keys, values) to attend over, each (B, R + T, K, H) (the ring before this call, then the
        new ones), and the updated ring."""
        index = self.source[:, :, None, None]
        take = self.take[:, :, None, None]
        new_ring = tuple(jnp.where(take, jnp.take_along_axis(new.astype(old.dtype), index, axis=1), old)
                         for old, new in zip(ring, (keys, values)))
        attended = tuple(jnp.concatenate([old.astype(new.dtype), new], axis=1)
                         for old, new in zip(ring, (keys, values)))
        return attended, new_ring


def ring_step(slot_positions, positions, valid, window: int):
    """One decoding call's plan for the ring buffers of every windowed layer.

    slot_positions (B, R) int32: the position each slot holds (-1: empty); positions (B, T) of this
    call's tokens and valid (B, T) bool (False on padding, which is neither attended nor kept).
    Returns (mask, write, new slot_positions): the AttentionMask (B, 1, T, R + T) over the ring then
    the new keys, the `RingWrite`, and the slots' positions after it.
    """
    n_slots = slot_positions.shape[1]
    big = jnp.iinfo(jnp.int32).max
    start = jnp.min(jnp.where(valid, positions, big), axis=1, keepdims=True)  # (B, 1) first new position
    live = (slot_positions >= 0) & (slot_positions < start)  # a slot this call rewrites is stale
    key_positions = jnp.concatenate([slot_positions, positions], axis=1)
    key_ok = jnp.concatenate([live, valid], axis=1)
    dense = key_ok[:, None, None, :] & in_window(positions, key_positions, window)
    slot_of = jax.nn.one_hot(positions % n_slots, n_slots, dtype=bool) & valid[:, :, None]  # (B, T, R)
    candidate = jnp.where(slot_of, positions[:, :, None], -1)
    take = jnp.max(candidate, axis=1) >= 0  # (B, R)
    write = RingWrite(source=jnp.argmax(candidate, axis=1).astype(jnp.int32), take=take)
    new_slots = jnp.where(take, jnp.max(candidate, axis=1), slot_positions)
    mask = AttentionMask(dense, not_fusable="KV-cache decoding (a mask by position over the cache)")
    return mask, write, new_slots.astype(jnp.int32)
