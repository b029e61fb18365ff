"""Sliding-window attention (`model.sliding_window`, `model.global_every`): the mask by positions
against a float64 loop (packed rows included), the per-layer pattern inside the scanned stack,
ring-buffer decoding against the full forward pass, and the KV-cache bytes `plan` counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import ModelConfig, MoEConfig
from lmjax.models import DecoderLM
from lmjax.models.layers import Attention, attention_mask
from lmjax.models.window import windowed
from lmjax.scaling.memory import kv_cache_bytes_per_sequence

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  sliding_window=3, global_every=2, init_std=0.3)


def float64_window_attention(x, attn, segments, positions, window):
    """The attention output by a loop over rows, heads and queries in float64: query t sees key s
    in its segment (not padding) with positions[s] <= positions[t] and positions[s] > positions[t] - W."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
    q, k, v = (np.einsum("btd,dnh->btnh", x, w) for w in (wq, wk, wv))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    context = np.zeros_like(q)
    for row in range(b):
        for head in range(n):
            for query in range(t):
                keys = [s for s in range(t) if segments[row, s] == segments[row, query] != 0
                        and positions[row, query] - window < positions[row, s] <= positions[row, query]]
                if not keys:
                    continue
                scores = np.array([q[row, query, head] @ k[row, s, head // group] for s in keys]) / np.sqrt(h)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                context[row, query, head] = sum(pi * v[row, s, head // group] for pi, s in zip(p, keys))
    return np.einsum("btnh,nhd->btd", context, wo)


def test_windowed_attention_matches_a_float64_loop_on_packed_rows():
    """Positions, not indices: the second document of the packed row restarts at 0, so its first
    keys are outside the window of nothing in the first document (which a window over indices
    would let them see)."""
    cfg = dataclasses.replace(CFG, position="learned")  # no rotation: the attention alone
    attn = Attention(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 11, cfg.d_model))
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
    positions = np.array([list(range(5)) + list(range(4)) + [0, 0], list(range(11))])
    expected = float64_window_attention(x, attn, segments, positions, window=3)
    mask = windowed(attention_mask(jnp.asarray(segments), causal=True), jnp.asarray(positions), 3)
    for kernel in ("einsum", "dot_product"):
        attn.cfg = dataclasses.replace(cfg, attention=kernel)
        out = np.asarray(attn(x, jnp.asarray(positions), mask))
        np.testing.assert_allclose(out[segments != 0], expected[segments != 0], atol=1e-5)


def test_each_layer_of_the_scan_attends_by_its_pattern():
    """MoE every 2nd layer and a global layer every 4th: one scanned cycle of 4 blocks, each block
    with its own kind and window; equal to running the layers one by one with masks built here."""
    cfg = dataclasses.replace(CFG, global_every=4, moe=MoEConfig(n_experts=2, top_k=1, every=2))
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert model.stack.cycle() == [("blocks", 0, 3), ("moe_blocks", 0, 3), ("blocks", 1, 3), ("moe_blocks", 1, None)]
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 384)
    segments = jnp.array([[1] * 4 + [2] * 6])
    positions = jnp.array([list(range(4)) + list(range(6))])

    @nnx.jit
    def layer_by_layer(model, windows):
        q, k = positions[0][:, None], positions[0][None, :]
        causal = (segments[0][:, None] == segments[0][None, :]) & (k <= q)
        x = model._embed(tokens, positions, None)
        for i, window in enumerate(windows):
            layer_mask = causal if window is None else causal & (k > q - window)
            x = model.stack.layer(i)(x, positions, layer_mask[None, None])
        return model._head(x)

    ours = nnx.jit(lambda m: m(tokens, positions, segments))(model)
    np.testing.assert_allclose(ours, layer_by_layer(model, (3, 3, 3, None)), atol=1e-5)
    assert not np.allclose(ours, layer_by_layer(model, (None,) * 4), atol=1e-3)  # the windows matter here


def test_ring_buffer_decoding_equals_the_full_forward_pass():
    """Right-padded prompts of 7 and 3 tokens prefilled at once, then 9 tokens one at a time:
    every logit equals the full forward pass over the row, and the windowed layers' cache is a
    ring of W = 3 slots however long the decoding."""
    model = DecoderLM(CFG, rngs=nnx.Rngs(2))
    rows = np.asarray(jax.random.randint(jax.random.key(5), (2, 16), 0, 384))
    lengths = np.array([7, 3])
    prompt = np.where(np.arange(7) < lengths[:, None], rows[:, :7], 0)
    cache = model.init_cache(2, 16)
    assert cache["window"][0].shape == (2, 2, 3, 2, 8) and cache["full"][0].shape == (2, 2, 16, 2, 8)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    prefill = jax.jit(lambda t, p, c, m: model.decode(t, p, c, m))  # one jit each: quicker than op by op
    logits, cache = prefill(jnp.asarray(prompt), positions, cache, jnp.asarray(np.arange(7) < lengths[:, None]))
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(rows)))  # each row one sequence
    for r in range(2):
        np.testing.assert_allclose(logits[r, :lengths[r]], full[r][:lengths[r]], atol=1e-5)
    step = jax.jit(lambda t, p, c: model.decode(t, p, c))
    for t in range(9):
        at = lengths + t
        logits, cache = step(jnp.asarray(rows[[0, 1], at])[:, None], jnp.asarray(at)[:, None], cache)
        for r in range(2):
            np.testing.assert_allclose(logits[r, 0], full[r][at[r]], atol=1e-5)
    assert cache["window"][0].shape[2] == 3


def test_plan_counts_the_cache_init_cache_allocates():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    for length in (2, 20):  # a window wider than the cache keeps the cache's length
        cache = jax.eval_shape(lambda n=length: model.init_cache(3, n))
        held = sum(np.prod(a.shape) * a.dtype.itemsize for kind in ("full", "window") for a in cache[kind])
        assert held == 3 * kv_cache_bytes_per_sequence(cfg, length)
    # 2 global layers hold 20 positions, 2 windowed layers 3: 2 (k, v) * 2 kv heads * 8 wide * 2 bytes each
    assert kv_cache_bytes_per_sequence(cfg, 20) == 2 * 2 * 8 * 2 * (2 * 20 + 2 * 3)


def test_flops_count_the_windowed_layers_pairs():
    """32 tokens, W = 3: a windowed layer computes 3 * 32 - 9 / 2 query-key pairs, not 32^2 / 2;
    2 of the 4 layers are windowed; 12 FLOPs per pair and attention width (4 heads x 8)."""
    from lmjax.scaling.counting import train_flops_per_example

    whole = train_flops_per_example(dataclasses.replace(CFG, sliding_window=None, global_every=None), 32)
    assert whole - train_flops_per_example(CFG, 32) == 2 * 12 * (32 * 32 / 2 - (3 * 32 - 9 / 2)) * 32


def test_generate_with_ring_buffers_is_greedy_under_the_full_forward_pass():
    """`generate` (right-padded prompts, prefill, then a scan of one-token steps over the ring
    buffers): every new token is the argmax of the full forward pass over the text before it."""
    from lmjax.generate import generate

    model = DecoderLM(CFG, rngs=nnx.Rngs(4))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]
    forward = nnx.jit(lambda m, t: m(t))
    for prompt, new in zip(prompts, generate(model, prompts, 10, temperature=0.0)):
        text = np.concatenate([prompt, new])
        logits = np.asarray(forward(model, jnp.asarray(text[None])))[0]
        np.testing.assert_array_equal(new, logits[len(prompt) - 1:-1].argmax(-1))
