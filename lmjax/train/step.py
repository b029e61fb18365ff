"""The jitted training and evaluation steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.config import MoEConfig
from lmjax.families import family_of
from lmjax.models.moe import (
    PER_TOKEN_STATISTICS,
    concatenate_stacks,
    max_violation,
    pop_routing_by_stack,
    update_router_bias,
)
from lmjax.train.guard import BadStepRule, apply_if_good
from lmjax.train.optimizer import updated_params
from lmjax.train.state import TrainState, split_trainable
from lmjax.train.transforms import WeightTransform, adapter_of


def _loss_sum(params, graphdef, batch, dropout_key, moe: MoEConfig, frozen=None, adapt=None, fixed=None):
    """Differentiated objective of one (micro-)batch of (B, T) arrays, and its parts.

    Returns (objective, (loss_sum, count, routing)): loss_sum is the family's summed token loss
    (nats; next token, masked tokens or span targets, see the family spec's `token_losses`) over `count`
    tokens; for MoE models the objective adds count * (load_balance_coef * balancing loss +
    z_loss_coef * z loss + sequence_balance_coef * sequence balancing loss), each averaged over
    MoE layers, and `routing` holds the routing statistics per block stack, each stacked over its
    MoE layers (`pop_routing_by_stack`; empty for dense models). `fixed`: the model's variables
    that are not trained (router biases), merged in undifferentiated. With `adapt`, the
    model's weights are `adapt(frozen, params)` (LoRA: frozen base weights, the trained
    adapters beside them as `LowRankWeight`s, `Adapter.apply`), differentiated with respect to `params` alone.
    """
    weights = params if adapt is None else adapt(frozen, params)
    model = nnx.merge(graphdef, weights) if not fixed else nnx.merge(graphdef, weights, fixed)
    losses = family_of(model.cfg).token_losses(model, batch, dropout_key)
    loss_sum, count = jnp.sum(losses), jnp.sum(batch["loss_mask"])
    by_stack = pop_routing_by_stack(model)
    for stats in by_stack.values():
        for per_token in PER_TOKEN_STATISTICS:  # per-token assignments: for analysis, not for the metrics
            stats.pop(per_token, None)
    routing = concatenate_stacks(by_stack)
    objective = loss_sum
    if routing:
        aux = moe.load_balance_coef * jnp.mean(routing["load_balance_loss"]) + moe.z_loss_coef * jnp.mean(
            routing["z_loss"])
        if moe.sequence_balance_coef:
            aux = aux + moe.sequence_balance_coef * jnp.mean(routing["sequence_balance_loss"])
        objective = objective + count * aux
    return objective, (loss_sum, count, by_stack)


def routing_metrics(routing: dict) -> dict:
    """Scalar summaries of stacked routing statistics (L_moe, ...) for the metrics log:
    balancing and z losses, dropped share, share of tokens no expert serves (`moe_unrouted`)
    and router entropy averaged over MoE layers, and
    `moe_max_load`: the busiest expert's share of assignments over its fair share 1/E, at the
    worst layer (1.0 is perfectly balanced); `moe_max_violation`: MaxVio = E * max_i load_i - 1
    averaged over MoE layers, and per layer as `moe_max_violation_<l>` (l in routing.jsonl's
    layer order); `moe_sequence_balance_loss` when that loss is on."""
    if not routing:
        return {}
    n_experts = routing["load"].shape[-1]
    violation = max_violation(routing["load"])
    metrics = {
        "moe_load_balance_loss": jnp.mean(routing["load_balance_loss"]),
        "moe_z_loss": jnp.mean(routing["z_loss"]),
        "moe_dropped": jnp.mean(routing["dropped"]),
        "moe_unrouted": jnp.mean(routing["unrouted"]),
        "moe_entropy": jnp.mean(routing["entropy"]),
        "moe_max_load": jnp.max(routing["load"]) * n_experts,
        "moe_max_violation": jnp.mean(violation),
        **{f"moe_max_violation_{layer}": violation[layer] for layer in range(violation.shape[0])},
    }
    if "sequence_balance_loss" in routing:
        metrics["moe_sequence_balance_loss"] = jnp.mean(routing["sequence_balance_loss"])
    return metrics


def _balance(fixed: nnx.State, by_stack: dict, bias_update_rate: float) -> tuple[nnx.State, dict]:
    """(the untrained variables `fixed` with every router bias moved by its stack's assignment
    counts when `bias_update_rate` > 0, the step's routing statistics concatenated over stacks).
    by_stack: statistics per stack, averaged over micro-batches; each layer's `load` is recomputed
    from the counts, so that it is the load of the whole batch (micro-batches may hold different
    numbers of tokens)."""
    by_stack = {name: {**stats, "load": stats["counts"] / jnp.maximum(jnp.sum(stats["counts"], -1, keepdims=True),
                                                                      1.0)}
                for name, stats in by_stack.items()}
    if bias_update_rate > 0 and by_stack:
        fixed = update_router_bias(fixed, {name: stats["counts"] for name, stats in by_stack.items()},
                                   bias_update_rate)
    return fixed, concatenate_stacks(by_stack) or {}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    use_rng: bool, moe: MoEConfig = MoEConfig(), transforms: tuple[WeightTransform, ...] = (),
                    bad_steps: BadStepRule = BadStepRule()):
    """`train_step(state, batch, frozen=None) -> (state, metrics, routing)`.

    The batch (B, T) is split into `grad_accum_steps` micro-batches whose gradients of the summed
    loss are added, then divided by the total token count: the update equals the one computed on the
    whole batch at once. metrics: loss (nats/token), grad_norm, lr, tokens, and for MoE models
    `routing_metrics`; routing: the per-layer routing statistics (`_balance`; empty if dense).
    `use_rng` passes a per-step key to the model (dropout, router jitter). Only the `nnx.Param`s of
    `state.params` are differentiated and updated by the optimizer; router biases follow `_balance`.
    An adapting transform (LoRA) has the model read `Adapter.apply(frozen, params)`; `frozen` is not
    trained. With a guard in the state, a bad step (`bad_steps`, `lmjax.train.guard`) leaves params
    (router biases too) and optimizer state as they were; metrics add skipped_steps, bad_steps_in_a_row."""
    adapt = getattr(adapter_of(transforms), "apply", None)  # None: the model reads state.params
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

    def accumulate_gradients(params, batch, step_key, frozen, fixed):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def add_micro_batch(carry, inputs):
            index, micro_batch = inputs
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            (_, (loss_sum, count, routing)), grads = grad_fn(params, graphdef, micro_batch, key, moe, frozen, adapt,
                                                             fixed)
            total_loss, total_count, total_grads = carry
            return (total_loss + loss_sum, total_count + count, jax.tree.map(jnp.add, total_grads, grads)), routing

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, count, grads), routing = jax.lax.scan(add_micro_batch, init, (jnp.arange(grad_accum_steps), micro))
        return loss_sum, count, grads, jax.tree.map(lambda r: jnp.mean(r, axis=0), routing)

    def train_step(state: TrainState, batch, frozen=None):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if use_rng else None
        params, fixed = split_trainable(state.params)
        if grad_accum_steps == 1:
            (_, (loss_sum, count, stats)), grads = grad_fn(params, graphdef, batch, step_key, moe, frozen, adapt, fixed)
        else:
            loss_sum, count, grads, stats = accumulate_gradients(params, batch, step_key, frozen, fixed)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)  # bfloat16 params: bfloat16 grads
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = updated_params(params, updates, opt_state)
        fixed, routing = _balance(fixed, stats, moe.bias_update_rate)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": count,
            **routing_metrics(routing),
        }
        params = nnx.merge_state(params, fixed)
        guard = state.guard
        if guard is not None:
            (params, opt_state), guard, judged = apply_if_good(bad_steps, guard, metrics["loss"], metrics["grad_norm"],
                                                               (params, opt_state), (state.params, state.opt_state))
            metrics.update(judged)
        return TrainState(params, opt_state, state.step + 1, state.rng, guard), metrics, routing

    return train_step


def eval_step(graphdef, params, batch, token_bytes):
    """(loss_sum, token_count, byte_count, per-token losses (B, T)) of one batch;
    byte_count is the number of UTF-8 bytes the counted targets decode to, from
    `token_bytes` (V,) (for bits per byte)."""
    model = nnx.merge(graphdef, params)
    model.eval()
    losses = family_of(model.cfg).token_losses(model, batch)
    pop_routing_by_stack(model)
    byte_count = jnp.sum(token_bytes[batch["targets"]] * batch["loss_mask"])
    return jnp.sum(losses), jnp.sum(batch["loss_mask"]), byte_count, losses
