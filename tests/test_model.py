import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.config import ModelConfig
from lmjax.models import DecoderLM
from lmjax.models.layers import Attention, attention_mask

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def tokens(batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_causal_future_tokens_do_not_change_past_logits(position):
    model = DecoderLM(dataclasses.replace(CFG, position=position), rngs=nnx.Rngs(0))
    x = tokens()
    t = 7
    changed = x.at[:, t + 1:].set((x[:, t + 1:] + 13) % 256)
    before, after = model(x), model(changed)
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    assert not np.allclose(before[:, t + 1:], after[:, t + 1:])


def test_packed_segments_do_not_attend_across_boundaries():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    a, b = tokens(1, 6, seed=1), tokens(1, 10, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    logits = model(packed, positions, segments)
    # each document alone gives the same logits as inside the packed row
    np.testing.assert_allclose(logits[:, :6], model(a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 6:], model(b), atol=1e-5)


def naive_attention(q, k, v, mask):
    """Per-head softmax(q k^T / sqrt(H)) v, kv heads repeated for grouped queries."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def test_attention_matches_naive_reference():
    cfg = dataclasses.replace(CFG, position="learned")  # no rotation: compare the attention itself
    attn = Attention(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 10, cfg.d_model))
    segments = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
    mask = attention_mask(segments, causal=True)
    q = jnp.einsum("btd,dnh->btnh", x, attn.wq[...])
    k = jnp.einsum("btd,dkh->btkh", x, attn.wk[...])
    v = jnp.einsum("btd,dkh->btkh", x, attn.wv[...])
    expected = jnp.einsum("btnh,nhd->btd", naive_attention(q, k, v, mask), attn.wo[...])
    for kernel in ("einsum", "dot_product"):
        attn.cfg = dataclasses.replace(cfg, attention=kernel)
        np.testing.assert_allclose(attn(x, None, mask), expected, atol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa = DecoderLM(CFG, rngs=nnx.Rngs(0))  # 4 query heads, 2 kv heads
    mha = DecoderLM(dataclasses.replace(CFG, n_kv_heads=None), rngs=nnx.Rngs(1))
    gqa_params = nnx.state(gqa)
    mha_params = jax.tree.map(lambda x: x, gqa_params)
    for name in ("wk", "wv"):  # (L, D, K, H) -> (L, D, N, H): query head n uses kv head n // 2
        mha_params["stack"]["blocks"]["attn"][name] = nnx.Param(
            jnp.repeat(gqa_params["stack"]["blocks"]["attn"][name][...], 2, axis=2))
    nnx.update(mha, mha_params)
    np.testing.assert_allclose(mha(tokens()), gqa(tokens()), atol=1e-5)


def test_scanned_and_unrolled_layers_agree():
    scanned = DecoderLM(CFG, rngs=nnx.Rngs(0))
    unrolled = DecoderLM(dataclasses.replace(CFG, scan_layers=False, remat="full"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(scanned(tokens()), unrolled(tokens()), atol=1e-5)


def test_bfloat16_compute_matches_float32_on_trained_weights():
    """Trained weights (40 Adam steps on rows that are arithmetic progressions, until the loss is
    near 0 and the logits are large) run with bfloat16 activations give the per-position losses of
    float32 activations to within bf16's precision. (At random init every logit is near 0 and
    every loss near log V, so there a broken bf16 path could not show.)"""
    import optax

    from lmjax.train.losses import token_losses

    rows = jnp.arange(8)[:, None]
    x = (rows * 7 + jnp.arange(33)[None] * (rows + 1)) % 256
    inputs, targets, mask = x[:, :-1], x[:, 1:], jnp.ones((8, 32))

    def graphdef(dtype):
        return nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(dataclasses.replace(CFG, dtype=dtype), rngs=nnx.Rngs(0))))

    def losses(dtype, params):  # (B, T) nats
        return token_losses(nnx.merge(graphdef(dtype), params)(inputs), targets, mask)

    params = nnx.state(DecoderLM(dataclasses.replace(CFG, dtype="float32"), rngs=nnx.Rngs(0)))
    adam = optax.adam(1e-2)

    @jax.jit
    def step(params, adam_state):
        grads = jax.grad(lambda p: jnp.mean(losses("float32", p)))(params)
        updates, adam_state = adam.update(grads, adam_state, params)
        return optax.apply_updates(params, updates), adam_state

    adam_state = adam.init(params)
    for _ in range(40):
        params, adam_state = step(params, adam_state)
    f32, bf16 = np.asarray(losses("float32", params)), np.asarray(losses("bfloat16", params))
    assert f32.mean() < 0.5  # trained: confident predictions, logits far from 0
    assert nnx.merge(graphdef("bfloat16"), params)(inputs).dtype == jnp.float32  # logits and loss in float32
    # bf16 keeps ~3 significant digits; logits computed or normalised in bf16 would move the losses more
    assert np.abs(bf16 - f32).max() < 1e-2 and np.abs(bf16 - f32).mean() < 2e-3


def test_attention_kernels_agree():
    x = tokens()
    einsum = DecoderLM(dataclasses.replace(CFG, attention="einsum"), rngs=nnx.Rngs(0))
    dot_product = DecoderLM(dataclasses.replace(CFG, attention="dot_product"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(einsum(x), dot_product(x), atol=1e-5)


def test_inputs_longer_than_the_model_are_refused_unless_a_rope_scaling_extends_it():
    from lmjax.config import ConfigError

    model = DecoderLM(CFG, rngs=nnx.Rngs(0))  # max_seq_len 32
    with pytest.raises(ConfigError, match="an input of 33 positions is longer than the model's 32"):
        model(tokens(1, 33))
    with pytest.raises(ConfigError, match="a KV cache of 40 positions"):
        model.init_cache(1, 40)
    scaled = DecoderLM(dataclasses.replace(CFG, rope_scaling="linear", rope_scaling_factor=2.0,
                                           rope_original_max_len=32), rngs=nnx.Rngs(0))
    assert scaled(tokens(1, 64)).shape == (1, 64, 384)
    with pytest.raises(ConfigError, match="65 positions is longer than the model's 64"):
        scaled(tokens(1, 65))
