"""Encoder and encoder-decoder models: attention directions, padding, relative position
buckets, cached generation, parameter and FLOP counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.config import ModelConfig, MoEConfig
from lmjax.families import family_of
from lmjax.generate import generate_targets
from lmjax.models import EncoderDecoderLM, EncoderLM
from lmjax.models.layers import relative_position_bucket
from lmjax.scaling.counting import param_counts, train_flops_per_token

BASE = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
ENCODER = dataclasses.replace(BASE, family="encoder")
ENC_DEC = dataclasses.replace(BASE, family="encoder_decoder", n_decoder_layers=1)


def jitted(model):
    """The model's __call__ under jax.jit (eager op-by-op calls are slow on CPU)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda *args: nnx.merge(graphdef, params)(*args))


def tokens(batch, length, seed):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_encoder_is_bidirectional_and_ignores_padding(position):
    model = jitted(EncoderLM(dataclasses.replace(ENCODER, position=position), rngs=nnx.Rngs(0)))
    x = tokens(2, 12, 0)
    later_changed = x.at[:, 9].set((x[:, 9] + 7) % 256)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    before, after = model(x, positions, jnp.ones_like(x)), model(later_changed, positions, jnp.ones_like(x))
    assert not np.allclose(before[:, 2], after[:, 2])  # position 2 sees position 9
    # 4 padding tokens (segment 0) of any value change nothing at the real positions
    padded = jnp.concatenate([x, tokens(2, 4, 1)], axis=1)
    segments = jnp.concatenate([jnp.ones((2, 12), int), jnp.zeros((2, 4), int)], axis=1)
    other_padding = padded.at[:, 12:].set(tokens(2, 4, 2))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    alone = model(x, positions[:, :12], jnp.ones_like(x))
    np.testing.assert_allclose(model(padded, positions, segments)[:, :12], alone, atol=1e-5)
    np.testing.assert_allclose(model(other_padding, positions, segments)[:, :12], alone, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_encoder_decoder_causal_decoder_and_cross_attention_over_unpadded_inputs(position):
    full = jitted(EncoderDecoderLM(dataclasses.replace(ENC_DEC, position=position), rngs=nnx.Rngs(0)))

    def model(enc, dec, segments=None):
        return full(enc, dec, jnp.ones_like(enc) if segments is None else segments, jnp.ones_like(dec))

    enc, dec = tokens(2, 10, 0), tokens(2, 8, 1)
    base = model(enc, dec)
    t = 4  # decoder: changing tokens after t leaves logits up to t unchanged
    later = model(enc, dec.at[:, t + 1:].set((dec[:, t + 1:] + 5) % 256))
    np.testing.assert_array_equal(base[:, : t + 1], later[:, : t + 1])
    assert not np.allclose(base[:, t + 1:], later[:, t + 1:])
    # the first decoder position already sees every encoder position, the last one included
    assert not np.allclose(base[:, 0], model(enc.at[:, -1].set((enc[:, -1] + 3) % 256), dec)[:, 0])
    # encoder padding (segment 0) is invisible to the cross-attention
    segments = jnp.concatenate([jnp.ones((2, 7), int), jnp.zeros((2, 3), int)], axis=1)
    padded = model(enc, dec, segments)
    np.testing.assert_allclose(padded, model(enc.at[:, 7:].set(tokens(2, 3, 9)), dec, segments), atol=1e-5)
    np.testing.assert_allclose(padded, model(enc[:, :7], dec), atol=1e-5)


def t5_bucket_reference(relative: int, bidirectional: bool, n_buckets: int, max_distance: int) -> int:
    """T5's bucketing written as a plain scalar loop body (relative = key - query)."""
    bucket = 0
    n = -relative
    if bidirectional:
        n_buckets //= 2
        if n < 0:
            bucket += n_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    exact = n_buckets // 2
    if n < exact:
        return bucket + n
    far = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (n_buckets - exact))
    return bucket + min(far, n_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_t5(bidirectional):
    relative = np.arange(-300, 301)
    got = np.asarray(relative_position_bucket(jnp.asarray(relative), bidirectional, 32, 128))
    expected = [t5_bucket_reference(int(r), bidirectional, 32, 128) for r in relative]
    np.testing.assert_array_equal(got, expected)
    # by hand: bidirectional halves of 16 (8 exact); key 20 before the query -> 8 + int(8 * ln 2.5 / ln 16) = 10,
    # 20 after -> 16 + 10; causal: 16 exact, 20 before -> 16 + int(16 * ln 1.25 / ln 8) = 17, any key after -> 0
    lookup = dict(zip(relative.tolist(), got.tolist()))
    assert (lookup[-20], lookup[20], lookup[-1]) == ((10, 26, 1) if bidirectional else (17, 0, 1))


def greedy_by_full_forward(model, inputs, n_new, start):
    """Greedy targets by re-running the whole model on every prefix, no cache. The decoder
    input has a fixed length (one compile); positions past the prefix cannot matter, as the
    decoder is causal."""
    forward = jitted(model)
    enc = jnp.asarray([inputs])
    out = np.full(n_new + 1, start)
    for t in range(n_new):
        logits = forward(enc, jnp.asarray([out]), jnp.ones_like(enc), jnp.ones((1, n_new + 1), int))
        out[t + 1] = int(jnp.argmax(logits[0, t]))
    return out[1:]


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_encoder_decoder_cached_greedy_equals_full_forward_greedy(position):
    cfg = dataclasses.replace(ENC_DEC, position=position, init_std=0.3, tie_embeddings=False)
    model = EncoderDecoderLM(cfg, rngs=nnx.Rngs(1))
    prompts = [np.arange(40, 51), np.arange(100, 105)]  # batched, different lengths (padding)
    cached = generate_targets(model, prompts, 10, temperature=0.0, start_token=257)
    for prompt, got in zip(prompts, cached):
        expected = greedy_by_full_forward(model, prompt, 10, 257)
        np.testing.assert_array_equal(got, expected)
        assert len(set(expected.tolist())) > 1  # not a constant sequence that any decoder would reproduce


def built_param_count(cfg: ModelConfig) -> int:
    model = nnx.eval_shape(lambda: family_of(cfg).build(cfg, nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("cfg", [
    ENCODER,
    dataclasses.replace(ENCODER, position="learned", norm="layernorm", mlp="gelu", tie_embeddings=False),
    dataclasses.replace(BASE, position="relative"),
    ENC_DEC,
    dataclasses.replace(ENC_DEC, position="relative", tie_embeddings=False, n_decoder_layers=3),
    dataclasses.replace(ENC_DEC, position="learned", moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1)),
])
def test_counted_params_equal_built_model(cfg):
    assert param_counts(cfg)["params_total"] == built_param_count(cfg)


def test_train_flops_by_hand():
    d, v, f, heads = 32, 384, 64, 32  # 4 heads of 8: attention width 32, kv 2 heads of 8 = 16
    attention = 2 * d * 32 + 2 * d * 16  # wq, wo; wk, wv
    mlp = 3 * d * f
    norm = d
    # encoder: 2 layers, T = 16, bidirectional attention 12 * L * T * width per token
    encoder_layers = 2 * (attention + mlp + 2 * norm) + norm
    expected = 6 * (encoder_layers + d * v) + 12 * 2 * 16 * heads
    assert train_flops_per_token(ENCODER, 16) == expected
    # encoder-decoder: S = 20 inputs, T = 6 targets, 2 encoder and 1 decoder layer
    s, t = 20, 6
    encoder = 2 * (attention + mlp + 2 * norm) + norm
    cross_kv = 2 * d * 16
    decoder = (attention + mlp + 2 * norm) + (attention + norm) + norm - cross_kv
    per_example = (6 * (s * encoder + t * (decoder + d * v) + s * cross_kv)
                   + (12 * 2 * s * s + 6 * 1 * t * t + 12 * 1 * t * s) * heads)
    assert train_flops_per_token(ENC_DEC, s, t) == per_example / (s + t)
