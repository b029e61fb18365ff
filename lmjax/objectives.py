"""Training objectives. The causal LM loss: next-token cross-entropy over masked targets."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_losses(logits, targets, loss_mask):
    """Next-token cross-entropy (nats) of every position, 0 where loss_mask is 0.

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float -> (B, T) float32.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return losses * loss_mask


def causal_lm_loss(logits, targets, loss_mask):
    """Summed next-token cross-entropy and the number of tokens it covers.

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float (1 = counts).
    Returns (loss_sum in nats, token_count), both float32 scalars, so callers can average
    exactly across micro-batches and devices.
    """
    return jnp.sum(token_losses(logits, targets, loss_mask)), jnp.sum(loss_mask)
