"""AdamW with a warmup + decay learning-rate schedule, clipping and a weight-decay mask;
under µP, per-parameter learning-rate multipliers read from the parameters' roles; and
optionally float32 master weights for bfloat16 parameters."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.config import ModelConfig, OptimConfig

# Weight decay by parameter role (`lmjax.models.layers.ROLES`): matrices that map activations
# decay; looked-up rows (token and position embeddings, relative-bias tables) and vectors (norm
# gains, biases) do not. The relative-bias table is an embedding of distance buckets: decaying it
# would only pull every position bias toward "ignore position", for no capacity it controls.
DECAYED_ROLES = ("hidden", "output")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `warmup_steps`, then cosine/linear decay to
    `lr * min_lr_ratio` at `total_steps` (or constant); "wsd" stays at `lr` until
    `optim.wsd_decay_start(total_steps)` and decays linearly to `lr * min_lr_ratio` over the remaining steps."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = cfg.wsd_decay_start(total_steps)
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
    return jax.tree.map(lambda role: role in DECAYED_ROLES, parameter_roles(params))


def parameter_roles(params: nnx.State):
    """The tree of `params` with each parameter replaced by its role ("input", "hidden",
    "output" or "vector": its `role` metadata, see `lmjax.models.layers`)."""

    def role(path, variable) -> str:
        name = variable.get_metadata().get("role")
        if name is None:
            dotted = ".".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(f"parameter {dotted} has no role; create it with "
                             "lmjax.models.layers.param(..., role=...).")
        return name

    return jax.tree_util.tree_map_with_path(role, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mup_learning_rate_multipliers(model: ModelConfig) -> dict[str, float]:
    """µP's learning-rate multiplier of each parameter role under Adam (Yang et al., Tensor
    Programs V, Table 3): hidden matrices 1 / m (their fan-in grows by the width multiplier
    m); input-like (embeddings, positions, relative-bias tables), output-like (the head,
    whose logits are multiplied by 1 / m instead, and the MoE router) and vector-like
    parameters 1. All 1.0 under the standard parametrization."""
    return {"input": 1.0, "hidden": 1.0 / model.width_multiplier, "output": 1.0, "vector": 1.0}


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State,
                   model: ModelConfig | None = None) -> optax.GradientTransformation:
    """optax chain: global-norm clip (optional) -> AdamW with decoupled, masked weight decay
    -> under µP (`model.parametrization`), each parameter's update times its role's
    `mup_learning_rate_multipliers`; the decay is part of the update, so it follows the
    parameter's learning rate, as in optax's adamw. Adam's epsilon is `cfg.eps` times
    `model.adam_eps_multiplier` (1/m under µP with model.mup_scale_adam_eps)."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps if model is None else cfg.eps * model.adam_eps_multiplier,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask(params),
    )
    if model is not None and model.parametrization == "mup":
        scales = {role: optax.scale(m) for role, m in mup_learning_rate_multipliers(model).items()}
        adamw = optax.chain(adamw, optax.multi_transform(scales, parameter_roles(params)))
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
