"""Looking inside a trained DecoderLM: attention probabilities, expert routing, parameter tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.models.layers import attention_mask, matmul, rope


def attention_maps(model, tokens) -> np.ndarray:
    """Attention probabilities of every layer and head for one sequence of token ids:
    (L, N, T, T) float32, row t = how query t spreads over keys 0..t."""
    cfg = model.cfg
    tokens = jnp.asarray(tokens, jnp.int32)[None]  # (1, T)
    positions = jnp.arange(tokens.shape[1])[None]
    mask = attention_mask(jnp.ones_like(tokens), causal=True)  # (1, 1, T, T)
    x = model._embed(tokens, positions, None)
    maps = []
    for layer in range(cfg.n_layers):
        block = model.stack.layer(layer)
        h, attn = block.attn_norm(x), block.attn
        q, k = matmul(h, attn.wq[...]), matmul(h, attn.wk[...])  # (1, T, N, H), (1, T, K, H)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        k = jnp.repeat(k, cfg.n_heads // cfg.kv_heads, axis=2)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) / np.sqrt(cfg.head_dim)
        maps.append(jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)[0])
        x = block(x, positions, mask)
    return np.asarray(jnp.stack(maps))


def routing_assignments(model, tokens) -> dict:
    """How a MoE model routes one sequence of token ids, at evaluation settings.

    Returns {"experts": (L_moe, T, k) int expert ids, best first; "load": (L_moe, E) share of
    the assignments each expert got; "moe_layers": the MoE layers' indices}.
    """
    from lmjax.models.moe import pop_routing_statistics

    cfg = model.cfg
    if not cfg.moe.enabled:
        raise ValueError("routing_assignments needs a mixture-of-experts model (model.moe.n_experts > 0).")
    model.eval()
    model(jnp.asarray(tokens, jnp.int32)[None])
    stats = pop_routing_statistics(model)
    return {"experts": np.asarray(stats["experts"][:, 0]), "load": np.asarray(stats["load"]),
            "moe_layers": [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]}


def parameter_table(model) -> list[dict]:
    """One row per parameter: path, shape, logical axes, count."""
    rows = []
    for path, variable in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                              is_leaf=lambda x: isinstance(x, nnx.Variable)):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        rows.append({"parameter": name, "shape": tuple(variable.shape), "axes": tuple(variable.out_sharding or ()),
                     "count": int(np.prod(variable.shape))})
    return rows
