"""DecoderLM: a causal transformer language model (GPT/LLaMA-style)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.config import ModelConfig
from lmjax.models.layers import Embed, attention_mask, make_norm, matmul, param
from lmjax.models.transformer import Stack, dropout


class DecoderLM(nnx.Module):
    """Token (+ learned position) embedding -> scanned pre-norm blocks -> norm -> logits.

    `__call__(tokens, positions, segment_ids) -> logits (B, T, V) float32`, where
    tokens, positions and segment_ids are (B, T) int arrays. Tokens attend causally and
    only within their segment (packed documents); segment id 0 marks padding.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("length", "embed"), cfg.init_std,
                                   cfg.param_dtype)
        self.stack = Stack(cfg, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                                 cfg.param_dtype)

    def __call__(self, tokens, positions=None, segment_ids=None, dropout_key=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self._embed(tokens, positions, dropout_key)
        embed_key, stack_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = self.stack(x, positions, attention_mask(segment_ids, causal=True), stack_key)
        return self._logits(x)

    def init_cache(self, batch_size: int, length: int):
        """An empty KV cache of `length` slots: (keys, values), each (L, B, S, K, H) in the
        compute dtype."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch_size, length, cfg.kv_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)

    def decode(self, tokens, positions, cache):
        """Run tokens (B, T) at absolute positions (B, T) against a KV cache; returns
        (logits (B, T, V) float32, updated cache). A query at position p attends to the
        cache slots 0..p of its row, which must hold that row's earlier tokens."""
        slots = jnp.arange(cache[0].shape[2])
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        x, cache = self.stack(self._embed(tokens, positions, None), positions, mask, cache=cache)
        return self._logits(x), cache

    def _embed(self, tokens, positions, dropout_key):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = self.embed(tokens, dtype)  # (B, T, D)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dtype)
        return dropout(x, cfg.dropout, None if dropout_key is None else jax.random.split(dropout_key)[0])

    def _logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            return self.embed.attend(x)
        return matmul(x, self.unembed[...], out_dtype=jnp.float32)
