"""Sampling text from a trained DecoderLM.

This sampler recomputes the whole (fixed-length) context for every new token; it is
exact and simple, and fast enough for the short samples printed after training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits, key, temperature: float, top_k: int | None):
    """Draw one token id per row from logits (B, V): greedy when temperature == 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: nnx.Module, prompt_ids: np.ndarray, max_new_tokens: int, seed: int = 0,
             temperature: float = 0.8, top_k: int | None = None) -> np.ndarray:
    """Continue a 1-D prompt of token ids by `max_new_tokens` tokens; returns only the new ids.

    prompt length + max_new_tokens must fit in the model's max_seq_len.
    """
    prompt = np.asarray(prompt_ids, np.int32)
    length = len(prompt) + max_new_tokens
    if len(prompt) == 0 or length > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens must be within "
                         f"model.max_seq_len={model.cfg.max_seq_len} (and the prompt non-empty).")
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, tokens, key):
        model = nnx.merge(graphdef, params)

        def next_token(t, tokens):
            logits = model(tokens)[:, t - 1]  # (1, V): causal, so later slots do not matter
            token = sample_logits(logits, jax.random.fold_in(key, t), temperature, top_k)
            return tokens.at[:, t].set(token.astype(tokens.dtype))

        return jax.lax.fori_loop(len(prompt), length, next_token, tokens)

    tokens = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(prompt)
    out = run(params, tokens, jax.random.key(seed))
    return np.asarray(out[0, len(prompt):])
