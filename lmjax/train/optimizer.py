"""AdamW with a warmup + decay learning-rate schedule, clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from lmjax.config import OptimConfig

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
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
