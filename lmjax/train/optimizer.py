"""AdamW with a warmup + decay learning-rate schedule, clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from lmjax.config import OptimConfig

NO_DECAY_PARAMS = ("table", "pos_embed")  # token and position embeddings


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `warmup_steps`, then cosine/linear decay to
    `lr * min_lr_ratio` at `total_steps` (or constant); "wsd" stays at `lr` until the last
    `optim.wsd_decay_steps(total_steps)` steps and decays linearly to `lr * min_lr_ratio` over them."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        cooldown = min(cfg.wsd_decay_steps(total_steps), total_steps - warmup)
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
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
