"""The pre-norm transformer block and the stack of blocks (scanned or unrolled).

The stack keeps every layer's weights in one array per parameter with a leading
`layers` axis (L, ...), so scanned and unrolled execution share one checkpoint layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.config import ModelConfig
from lmjax.models.layers import MLP, Attention, make_norm
from lmjax.parallel import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dropout(x, rate: float, key):
    """Inverted dropout of x with probability `rate`; identity when key is None."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, dropout_key=None, cache=None):
        """With a KV `cache` (see Attention) returns (x, updated cache)."""
        keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        attended = self.attn(self.attn_norm(x), positions, mask, cache)
        if cache is not None:
            attended, cache = attended
        x = x + dropout(attended, self.dropout_rate, keys[0])
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])
        return x if cache is None else (x, cache)


class Stack(nnx.Module):
    """`n_layers` blocks with stacked weights (leading logical axis `layers`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def __call__(self, x, positions, mask, dropout_key=None, cache=None):
        """x (B, T, D), positions (B, T), mask (B, 1, T, S) -> (B, T, D).

        With `cache` = (keys, values), each (L, B, S, K, H), returns (x, updated cache).
        """
        cfg = self.cfg
        graphdef, weights = nnx.split(self.blocks)
        layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)

        def apply_layer(h, layer):
            layer_weights, key, layer_cache = layer
            out = nnx.merge(graphdef, layer_weights)(h, positions, mask, key, layer_cache)
            h, layer_cache = out if layer_cache is not None else (out, None)
            return constrain(h, ("batch", "length", None)), layer_cache

        if cfg.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        unroll = cfg.scan_unroll if cfg.scan_layers else True
        x, cache = jax.lax.scan(apply_layer, x, (weights, layer_keys, cache), unroll=unroll)
        return x if cache is None else (x, cache)
