"""AdamW with a warmup + decay learning-rate schedule, clipping, a weight-decay mask and,
under µP, per-parameter learning-rate multipliers read from the parameters' roles."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from lmjax.config import ModelConfig, OptimConfig

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


def parameter_roles(params: nnx.State):
    """The tree of `params` with each parameter replaced by its role ("input", "hidden",
    "output" or "vector": its `role` metadata, see `lmjax.models.layers`)."""

    def role(path, variable) -> str:
        name = variable.get_metadata().get("role")
        if name is None:
            dotted = ".".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(f"parameter {dotted} has no role; create it with lmjax.models.layers.param(..., role=...).")
        return name

    return jax.tree_util.tree_map_with_path(role, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mup_learning_rate_multipliers(model: ModelConfig) -> dict[str, float]:
    """µP's learning-rate multiplier of each parameter role under Adam (Yang et al., Tensor
    Programs V, Table 3): hidden matrices 1 / m (their fan-in grows by the width multiplier
    m); input-like (embeddings, positions, relative-bias tables), output-like (the head,
    whose logits are multiplied by 1 / m instead, and the MoE router) and vector-like
    parameters 1. All 1.0 under the standard parametrization."""
    hidden = 1.0 / model.width_multiplier if model.parametrization == "mup" else 1.0
    return {"input": 1.0, "hidden": hidden, "output": 1.0, "vector": 1.0}


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State,
                   model: ModelConfig | None = None) -> optax.GradientTransformation:
    """optax chain: global-norm clip (optional) -> AdamW with decoupled, masked weight decay
    -> under µP (`model.parametrization`), each parameter's update times its role's
    `mup_learning_rate_multipliers`; the decay is part of the update, so it follows the
    parameter's learning rate, as in optax's adamw."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask(params),
    )
    if model is not None and model.parametrization == "mup":
        scales = {role: optax.scale(m) for role, m in mup_learning_rate_multipliers(model).items()}
        adamw = optax.chain(adamw, optax.multi_transform(scales, parameter_roles(params)))
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
