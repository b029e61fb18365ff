"""The model switches Hugging Face architectures need, each against a hand-written reference:
a head width of its own (`d_head`), the attention logit scale, ReLU and gated-GELU
feed-forwards, and T5's rescale of a tied output head."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.config import ConfigError, ModelConfig
from lmjax.models import DecoderLM
from lmjax.models.layers import MLP, Attention, attention_mask
from lmjax.scaling.counting import param_counts

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, position="learned", max_seq_len=16)


def naive_attention(x, attn, mask, scale):
    """Per-head softmax(scale * q.k) v written out, kv heads repeated for grouped queries."""
    q = jnp.einsum("btd,dnh->btnh", x, attn.wq[...])
    k = jnp.einsum("btd,dkh->btkh", x, attn.wk[...])
    v = jnp.einsum("btd,dkh->btkh", x, attn.wv[...])
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.where(mask, scale * jnp.einsum("btnh,bsnh->bnts", q, k), -1e30)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)
    return jnp.einsum("btnh,nhd->btd", out, attn.wo[...])


@pytest.mark.parametrize("d_head, attention_scale, expected_scale", [
    (None, None, 8**-0.5),  # default: d_model / n_heads = 8 wide, 1/sqrt(8)
    (12, None, 12**-0.5),  # a head width of its own, and its default scale
    (12, 1.0, 1.0),  # T5: logits not scaled
])
def test_head_width_and_attention_scale(d_head, attention_scale, expected_scale):
    cfg = dataclasses.replace(CFG, d_head=d_head, attention_scale=attention_scale)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    assert attn.wq[...].shape == (32, 4, d_head or 8) and attn.wk[...].shape == (32, 2, d_head or 8)
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    mask = attention_mask(jnp.ones((2, 7), jnp.int32), causal=True)
    expected = naive_attention(x, attn, mask, expected_scale)
    for kernel in ("einsum", "dot_product"):
        attn.cfg = dataclasses.replace(cfg, attention=kernel)
        np.testing.assert_allclose(attn(x, None, mask), expected, atol=1e-5)


def test_head_width_of_its_own_is_counted():
    cfg = dataclasses.replace(CFG, d_head=12, n_heads=3, n_kv_heads=1)  # 3 * 12 != 32: no divisibility needed
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert param_counts(cfg)["params_total"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with pytest.raises(ConfigError, match="d_head"):
        dataclasses.replace(CFG, n_heads=3)  # 32 / 3 without d_head


@pytest.mark.parametrize("mlp", ["relu", "geglu", "gelu", "swiglu"])
def test_feed_forwards(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp)
    layer = MLP(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    up = x @ np.asarray(layer.w_up[...])
    tanh_gelu = lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))  # noqa: E731
    if mlp in ("geglu", "swiglu"):
        gate = x @ np.asarray(layer.w_gate[...])
        hidden = (tanh_gelu(gate) if mlp == "geglu" else gate / (1 + np.exp(-gate))) * up
    else:
        hidden = np.maximum(up, 0) if mlp == "relu" else tanh_gelu(up)
    np.testing.assert_allclose(layer(jnp.asarray(x)), hidden @ np.asarray(layer.w_down[...]), atol=1e-5)
    counted = param_counts(cfg)["params_total"]
    built = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert counted == sum(x.size for x in jax.tree.leaves(nnx.state(built, nnx.Param)))


def test_tied_output_rescale_multiplies_the_logits_by_d_model_to_the_minus_half():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 9)))
    plain = DecoderLM(CFG, rngs=nnx.Rngs(0))(ids)
    rescaled = DecoderLM(dataclasses.replace(CFG, tied_output_rescale=True), rngs=nnx.Rngs(0))(ids)
    np.testing.assert_allclose(rescaled, plain * 32**-0.5, rtol=1e-5, atol=1e-6)


def test_bert_switches_are_counted():
    """Post-norm blocks (no final norm), biases, token types, embedding norm, MLM head transform."""
    from lmjax.families import family_of

    cfg = dataclasses.replace(CFG, family="encoder", n_kv_heads=None, mlp="gelu_exact", norm="layernorm",
                              norm_placement="post", bias=True, token_types=2, embed_norm=True, mlm_head_transform=True)
    model = nnx.eval_shape(lambda: family_of(cfg).build(cfg, nnx.Rngs(0)))
    assert not hasattr(model, "final_norm")
    assert param_counts(cfg)["params_total"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
