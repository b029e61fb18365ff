"""The loss every family trains on: masked cross-entropy over (targets, loss_mask).

The batch builders of the three objectives (causal LM, masked LM, span corruption) are
numpy code on the data side (`lmjax.data.objectives`); which logits a family's model
produces for a batch is its family spec's `predict` (`lmjax.families`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_losses(logits, targets, loss_mask):
    """Cross-entropy (nats) of every position, 0 where loss_mask is 0.

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float -> (B, T) float32.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return losses * loss_mask


def causal_lm_loss(logits, targets, loss_mask):
    """Summed cross-entropy and the number of tokens it covers (every family's loss).

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float (1 = counts).
    Returns (loss_sum in nats, token_count), both float32 scalars, so callers can average
    exactly across micro-batches and devices.
    """
    return jnp.sum(token_losses(logits, targets, loss_mask)), jnp.sum(loss_mask)
