"""Text generation with a KV cache: prefill the prompts, then one token per step inside
one jit. Greedy, temperature, top-k and top-p (nucleus) sampling; a batch of prompts of
different lengths; stop tokens. `generate` continues the prompts of a DecoderLM;
`generate_targets` encodes an EncoderDecoderLM's inputs once and decodes targets from a
start token. A family's spec (`lmjax.families`) says which one it uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.data.tokenizer import ByteTokenizer


def filter_logits(logits, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """Logits (B, V) scaled by 1/temperature, with tokens outside the top k, or outside the
    smallest set whose probability reaches top_p, set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of better tokens
        keep_sorted = mass_before < top_p  # the token that reaches top_p is kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_token(logits, key, temperature: float, top_k: int | None, top_p: float | None):
    """One token id per row of logits (B, V): argmax when temperature == 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, params, tokens, lengths, max_new_tokens, temperature, top_k, top_p, key):
    """tokens (B, P) right-padded prompts of `lengths` (B,) -> (B, max_new_tokens) new ids."""
    model = nnx.merge(graphdef, params)
    model.eval()  # MoE: evaluation capacity factor, no router jitter
    batch, prompt_len = tokens.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
    logits, cache = model.decode(tokens, positions, cache, segment_ids=(positions < lengths[:, None]).astype(jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)
    first = sample_token(last, jax.random.fold_in(key, 0), temperature, top_k, top_p)

    def step(carry, t):
        token, cache = carry
        logits, cache = model.decode(token[:, None], (lengths + t - 1)[:, None], cache)
        token = sample_token(logits[:, 0], jax.random.fold_in(key, t), temperature, top_k, top_p)
        return (token, cache), token

    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _generate_encoder_decoder(graphdef, params, inputs, input_segments, start, max_new_tokens, temperature, top_k,
                              top_p, key):
    """inputs (B, S) right-padded (input_segments 0 on padding) -> (B, max_new_tokens) new ids,
    decoded after the start token `start`."""
    model = nnx.merge(graphdef, params)
    model.eval()
    batch = inputs.shape[0]
    cache = model.init_cache(batch, max_new_tokens, model.encode(inputs, input_segments))  # encoder runs once

    def step(carry, t):
        token, cache = carry
        logits, cache = model.decode(token[:, None], jnp.full((batch, 1), t), cache, input_segments)
        token = sample_token(logits[:, 0], jax.random.fold_in(key, t), temperature, top_k, top_p)
        return (token, cache), token

    _, new = jax.lax.scan(step, (jnp.full((batch,), start, jnp.int32), cache), jnp.arange(max_new_tokens))
    return new.T


def generate(model: nnx.Module, prompts: list, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: tuple[int, ...] = ()) -> list[np.ndarray]:
    """Continue each prompt (a 1-D sequence of token ids) of a DecoderLM by up to
    `max_new_tokens` tokens. Returns the new ids per prompt, cut after the first stop token
    (which is kept). The longest prompt + max_new_tokens must fit in model.cfg.context_length
    (max_seq_len, or longer with a RoPE scaling).
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    longest = max(len(p) for p in prompts)
    limit = model.cfg.context_length
    if min(len(p) for p in prompts) == 0 or max_new_tokens < 1 or longest + max_new_tokens > limit:
        raise ValueError(f"prompts of 1..{longest} tokens + max_new_tokens={max_new_tokens} must fit in the "
                         f"model's {limit} positions (model.max_seq_len={model.cfg.max_seq_len}; prompts "
                         "non-empty, at least one new token).")
    tokens = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    graphdef, params = nnx.split(model)
    out = np.asarray(_generate(graphdef, params, tokens, lengths, max_new_tokens, float(temperature), top_k,
                               top_p, jax.random.key(seed)))
    return _cut_at_stop(out, stop_tokens)


def generate_targets(model: nnx.Module, prompts: list, max_new_tokens: int, *, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     stop_tokens: tuple[int, ...] = (), start_token: int = ByteTokenizer.bos_id) -> list[np.ndarray]:
    """The targets of an EncoderDecoderLM for each prompt (a 1-D sequence of encoder input
    ids): up to `max_new_tokens` tokens decoded after `start_token` (the tokenizer's bos, as
    in training), with the same sampling as `generate`. Each prompt and max_new_tokens must
    fit in model.cfg.max_seq_len."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    longest, limit = max(len(p) for p in prompts), model.cfg.max_seq_len
    if min(len(p) for p in prompts) == 0 or not 1 <= max_new_tokens <= limit or longest > limit:
        raise ValueError(f"inputs of 1..{longest} tokens and max_new_tokens={max_new_tokens} must each fit in "
                         f"model.max_seq_len={limit} (inputs non-empty, at least one new token).")
    inputs = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        inputs[row, : len(prompt)] = prompt
    segments = (np.arange(longest) < np.array([len(p) for p in prompts])[:, None]).astype(np.int32)
    graphdef, params = nnx.split(model)
    out = np.asarray(_generate_encoder_decoder(graphdef, params, inputs, segments, int(start_token), max_new_tokens,
                                               float(temperature), top_k, top_p, jax.random.key(seed)))
    return _cut_at_stop(out, stop_tokens)


def _cut_at_stop(out: np.ndarray, stop_tokens) -> list[np.ndarray]:
    results = []
    for row in out:
        stops = np.flatnonzero(np.isin(row, stop_tokens))
        results.append(row[: stops[0] + 1] if len(stops) else row)
    return results
