"""Cross-entropy over whole logits: what the chunked head (`lmjax.models.head`, through the
family spec's `token_losses`) equals, for callers that already hold a batch's logits.

The batch builders of the three objectives (causal LM, masked LM, span corruption) are
numpy code on the data side (`lmjax.data.objectives`); which targets a family's model
predicts for a batch is its family spec's (`lmjax.families`).
"""

from __future__ import annotations

import jax.numpy as jnp

from lmjax.models.head import cross_entropy


def token_losses(logits, targets, loss_mask):
    """Cross-entropy (nats) of every position, 0 where loss_mask is 0.

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float -> (B, T) float32.
    """
    return cross_entropy(logits, targets) * loss_mask


def causal_lm_loss(logits, targets, loss_mask):
    """Summed cross-entropy and the number of tokens it covers (every family's loss).

    logits (B, T, V) float32; targets (B, T) int; loss_mask (B, T) float (1 = counts).
    Returns (loss_sum in nats, token_count), both float32 scalars, so callers can average
    exactly across micro-batches and devices.
    """
    return jnp.sum(token_losses(logits, targets, loss_mask)), jnp.sum(loss_mask)
