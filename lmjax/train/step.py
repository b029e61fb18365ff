"""The jitted training and evaluation steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.objectives import causal_lm_loss, token_losses
from lmjax.train.state import TrainState


def _loss_sum(params, graphdef, batch, dropout_key):
    """(summed loss, token count) of a decoder on one (micro-)batch of (B, T) arrays."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    return causal_lm_loss(logits, batch["targets"], batch["loss_mask"])


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    use_dropout: bool):
    """`train_step(state, batch) -> (state, metrics)`.

    The batch (B, T) is split into `grad_accum_steps` micro-batches whose gradients of the
    summed loss are added, then divided by the total token count: the update equals the one
    computed on the whole batch at once. metrics: loss (nats/token), grad_norm, lr, tokens.
    """
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

    def accumulate_gradients(params, batch, step_key):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def add_micro_batch(carry, inputs):
            index, micro_batch = inputs
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            (loss_sum, count), grads = grad_fn(params, graphdef, micro_batch, key)
            total_loss, total_count, total_grads = carry
            return (total_loss + loss_sum, total_count + count, jax.tree.map(jnp.add, total_grads, grads)), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        totals, _ = jax.lax.scan(add_micro_batch, init, (jnp.arange(grad_accum_steps), micro))
        return totals

    def train_step(state: TrainState, batch):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if use_dropout else None
        if grad_accum_steps == 1:
            (loss_sum, count), grads = grad_fn(state.params, graphdef, batch, step_key)
        else:
            loss_sum, count, grads = accumulate_gradients(state.params, batch, step_key)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": count,
        }
        return TrainState(params, opt_state, state.step + 1, state.rng), metrics

    return train_step


def eval_step(graphdef, params, batch, token_bytes):
    """(loss_sum, token_count, byte_count, per-token losses (B, T)) of one batch;
    byte_count is the number of UTF-8 bytes the counted targets decode to, from
    `token_bytes` (V,) (for bits per byte)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = token_losses(logits, batch["targets"], batch["loss_mask"])
    byte_count = jnp.sum(token_bytes[batch["targets"]] * batch["loss_mask"])
    return jnp.sum(losses), jnp.sum(batch["loss_mask"]), byte_count, losses
