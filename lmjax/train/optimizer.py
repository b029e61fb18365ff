"""AdamW with a warmup + decay learning-rate schedule, clipping and a weight-decay mask, and
optionally float32 master weights for bfloat16 parameters."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.config import OptimConfig

# Weight decay by parameter role (`lmjax.models.layers.ROLES`): matrices that map activations
# decay; looked-up rows (token and position embeddings, relative-bias tables) and vectors (norm
# gains, biases) do not. The relative-bias table is an embedding of distance buckets: decaying it
# would only pull every position bias toward "ignore position", for no capacity it controls.
DECAYED_ROLES = ("hidden", "output")


def wsd_decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """The step where a warmup-stable-decay schedule's final linear decay begins: the last
    round(decay_fraction * total_steps) steps (at least 1) decay, but never before warmup ends."""
    warmup = min(cfg.warmup_steps, total_steps)
    return total_steps - min(max(1, round(cfg.decay_fraction * total_steps)), total_steps - warmup)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `warmup_steps`, then cosine/linear decay to
    `lr * min_lr_ratio` at `total_steps` (or constant); "wsd" stays at `lr` until
    `wsd_decay_start` and decays linearly to `lr * min_lr_ratio` over the remaining steps."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = wsd_decay_start(cfg, total_steps)
        pieces = [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr),
                  optax.linear_schedule(cfg.lr, end, max(total_steps - start, 1))]
        return optax.join_schedules(pieces, [warmup, start])
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def weight_decay_mask(params: nnx.State):
    """True for the parameters whose role (their `role` metadata) is in DECAYED_ROLES: the
    weight matrices of the stack, the output head and the router; False for embeddings,
    relative-bias tables, norm gains and biases."""

    def decays(path, variable) -> bool:
        role = variable.get_metadata().get("role")
        if role is None:
            name = ".".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(f"parameter {name} has no role; create it with lmjax.models.layers.param(..., role=...).")
        return role in DECAYED_ROLES

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """optax chain: global-norm clip (optional) -> AdamW with decoupled, masked weight decay."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask(params),
    )
    optimizer = adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return with_master_weights(optimizer) if cfg.master_weights else optimizer


class MasterWeightsState(NamedTuple):
    """`master`: a float32 copy of the params (the weights being optimized); `inner`: the wrapped
    optimizer's state, kept in float32 like the master copy."""

    master: optax.Params
    inner: optax.OptState


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run in float32 on a master copy of the params held in the optimizer state.

    The gradients (in the params' dtype, e.g. bfloat16) are upcast, the update is added to the
    master copy, and the stored params become the master rounded to their dtype: updates far
    below one bfloat16 step accumulate instead of being rounded away. The returned updates are
    that rounding minus the params, in float32; `updated_params` applies them exactly.
    """

    def init(params):
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params):
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        rounded = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32), master,
                               params)
        return rounded, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def updated_params(params, updates, opt_state):
    """`optax.apply_updates`, except that with master weights the params are exactly the
    master copy rounded to their dtype (never a rounding of params + updates)."""
    if isinstance(opt_state, MasterWeightsState):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
    return optax.apply_updates(params, updates)
