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
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self.embed(tokens, dtype)  # (B, T, D)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dtype)
        embed_key, stack_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(x, cfg.dropout, embed_key)
        x = self.stack(x, positions, attention_mask(segment_ids, causal=True), stack_key)
        x = self.final_norm(x)
        if cfg.tie_embeddings:
            return self.embed.attend(x)
        return matmul(x, self.unembed[...], out_dtype=jnp.float32)
