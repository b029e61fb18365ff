import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.analysis import attention_maps, parameter_table
from lmjax.config import ModelConfig
from lmjax.models import DecoderLM
from lmjax.models.layers import attention_mask, einsum_attention, matmul, rope
from lmjax.scaling.counting import param_counts

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def test_attention_maps_are_causal_distributions_that_reproduce_attention():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    tokens = np.arange(10) * 7
    maps = attention_maps(model, tokens)
    assert maps.shape == (2, 4, 10, 10)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0)
    # layer 0's maps applied to its values give its attention output (RMSNorm and weights by hand)
    x = model._embed(jnp.asarray(tokens)[None], jnp.arange(10)[None], None)
    wnorm = model.stack.blocks.attn_norm.scale[...][0]
    h = (x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.norm_eps)) * wnorm
    v = jnp.repeat(matmul(h, model.stack.blocks.attn.wv[...][0]), 2, axis=2)[0]  # (T, N, H)
    from_maps = jnp.einsum("nts,snh->tnh", maps[0], v)
    positions = jnp.arange(10)[None]
    q = rope(matmul(h, model.stack.blocks.attn.wq[...][0]), positions, CFG.rope_theta)
    k = rope(matmul(h, model.stack.blocks.attn.wk[...][0]), positions, CFG.rope_theta)
    direct = einsum_attention(q, k, matmul(h, model.stack.blocks.attn.wv[...][0]),
                              attention_mask(jnp.ones((1, 10), jnp.int32), causal=True))[0]
    np.testing.assert_allclose(from_maps, direct, atol=1e-5)


def test_parameter_table_adds_up():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    table = parameter_table(model)
    assert sum(r["count"] for r in table) == param_counts(CFG)["params_total"]
    wq = next(r for r in table if r["parameter"].endswith("attn.wq"))
    assert wq["shape"] == (2, 32, 4, 8) and wq["axes"] == ("layers", "embed", "heads", "head_dim")
