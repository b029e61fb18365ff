"""AdamW with a warmup + decay learning-rate schedule, clipping, a weight-decay mask and,
under µP, per-parameter learning-rate multipliers read from the parameters' roles."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from lmjax.config import ModelConfig, OptimConfig

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
