"""Training objectives. The causal LM loss: next-token cross-entropy over masked targets."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def causal_lm_loss(logits, targets, loss_mask):
    """Summed next-token cross-entropy and the number of tokens it covers.

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float (1 = counts).
    Returns (loss_sum in nats, token_count), both float32 scalars, so callers can average
    exactly across micro-batches and devices.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * loss_mask), jnp.sum(loss_mask)
