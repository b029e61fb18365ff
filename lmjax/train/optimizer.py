"""AdamW with a warmup + decay learning-rate schedule, clipping and a weight-decay mask, and
optionally float32 master weights for bfloat16 parameters."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.config import OptimConfig

NO_DECAY_PARAMS = ("table", "pos_embed")  # token and position embeddings


def wsd_decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Steps of the final decay of a warmup-stable-decay schedule: round(decay_fraction * total), >= 1."""
    return max(1, round(cfg.decay_fraction * total_steps))


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `warmup_steps`, then cosine/linear decay to
    `lr * min_lr_ratio` at `total_steps` (or constant); "wsd" stays at `lr` until the last
    `wsd_decay_steps` steps and decays linearly to `lr * min_lr_ratio` over them."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        cooldown = min(wsd_decay_steps(cfg, total_steps), total_steps - warmup)
        stable = total_steps - warmup - cooldown
        pieces = [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr),
                  optax.linear_schedule(cfg.lr, end, max(cooldown, 1))]
        return optax.join_schedules(pieces, [warmup, warmup + stable])
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
    """True for weight matrices; False for norms, biases and embeddings.

    A parameter is a matrix when it has two or more axes besides the stacked `layers` axis.
    """

    def decays(path, variable) -> bool:
        names = [n for n in (variable.out_sharding or ()) if n != "layers"]
        return len(names) >= 2 and str(path[-1].key) not in NO_DECAY_PARAMS

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
