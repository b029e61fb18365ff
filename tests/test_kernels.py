"""Kernel selection per backend (attention, grouped matmul) and the remat policies.

The GPU path is exercised on CPU: the backend is reported as "gpu", every call of
`jax.nn.dot_product_attention` records the implementation asked for and then runs with
implementation="xla", so the arguments handed to cuDNN (causal flag, right-padding lengths)
are checked against the dense masks they replace.
"""

import dataclasses
import logging
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from lmjax.config import ModelConfig
from lmjax.models import DecoderLM, EncoderDecoderLM, kernels
from lmjax.models.layers import attention_mask
from lmjax.models.transformer import REMAT_POLICIES, Block
from lmjax.train.losses import causal_lm_loss

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  dtype="bfloat16")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the backend is a GPU; record each dot_product_attention call's implementation."""
    calls = []
    original = jax.nn.dot_product_attention

    def recorded(*args, implementation=None, **kwargs):
        calls.append({"implementation": implementation, **kwargs})
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(kernels, "backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    kernels._log_once.cache_clear()
    return calls


def tokens(batch=2, length=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


def test_decoder_without_segments_takes_cudnn_causal_and_matches_the_dense_mask(gpu):
    cudnn_model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    dense_model = DecoderLM(dataclasses.replace(CFG, attention="dot_product"), rngs=nnx.Rngs(0))
    x = tokens()
    fused = cudnn_model(x)
    assert [c["implementation"] for c in gpu] == ["cudnn"]  # one traced call: the layers are scanned
    assert gpu[0]["is_causal"] and gpu[0]["query_seq_lengths"] is None and "mask" not in gpu[0]
    np.testing.assert_allclose(fused, dense_model(x), atol=1e-6)
    assert gpu[-1]["implementation"] == "xla" and gpu[-1]["mask"] is not None


def test_packed_segments_fall_back_to_xla_and_say_why_once(gpu, caplog):
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    with caplog.at_level(logging.WARNING, logger="lmjax.models.kernels"):
        model(tokens(), None, segments)
        model(tokens(seed=1), None, segments)
    assert [c["implementation"] for c in gpu] == ["xla", "xla"]
    assert gpu[0]["mask"] is not None
    fallbacks = [r.getMessage() for r in caplog.records if "not cuDNN" in r.getMessage()]
    assert len(fallbacks) == 1 and "packed documents" in fallbacks[0]


@pytest.mark.parametrize("change, reason", [
    ({"dtype": "float32"}, "float32 compute"),
    ({"position": "relative"}, "attention bias"),
])
def test_what_cudnn_cannot_take_falls_back(gpu, change, reason):
    model = DecoderLM(dataclasses.replace(CFG, **change), rngs=nnx.Rngs(0))
    model(tokens())
    assert [c["implementation"] for c in gpu] == ["xla"]
    mask = kernels.AttentionMask(jnp.ones((1, 1, 4, 4), bool), causal=True)
    dtype = change.get("dtype", "bfloat16")
    assert reason in kernels.cudnn_obstacle(mask, "position" in change, dtype, CFG.head_dim)


def test_sliding_window_layers_fall_back_to_xla_with_the_window_and_say_why(gpu, caplog):
    cfg = dataclasses.replace(CFG, sliding_window=4, global_every=2)
    with caplog.at_level(logging.WARNING, logger="lmjax.models.kernels"):
        fused = DecoderLM(cfg, rngs=nnx.Rngs(0))(tokens())
    assert [c["implementation"] for c in gpu] == ["xla", "cudnn"]  # one cycle: a windowed layer, a global one
    fallbacks = [r.getMessage() for r in caplog.records if "not cuDNN" in r.getMessage()]
    assert len(fallbacks) == 1 and "sliding window" in fallbacks[0]
    dense = DecoderLM(dataclasses.replace(cfg, attention="dot_product"), rngs=nnx.Rngs(0))(tokens())
    np.testing.assert_allclose(fused, dense, atol=1e-6)


def test_encoder_decoder_right_padding_goes_to_cudnn_as_lengths(gpu):
    cfg = dataclasses.replace(CFG, family="encoder_decoder", n_decoder_layers=2)
    cudnn_model = EncoderDecoderLM(cfg, rngs=nnx.Rngs(0))
    dense_model = EncoderDecoderLM(dataclasses.replace(cfg, attention="dot_product"), rngs=nnx.Rngs(0))
    enc_lengths, dec_lengths = np.array([12, 7]), np.array([5, 9])
    enc_segments = jnp.asarray((np.arange(12) < enc_lengths[:, None]).astype(np.int32))
    dec_segments = jnp.asarray((np.arange(10) < dec_lengths[:, None]).astype(np.int32))
    args = (tokens(), tokens(length=10, seed=1), enc_segments, dec_segments)
    fused = cudnn_model(*args)
    encoder_self, decoder_self, cross = gpu
    assert all(c["implementation"] == "cudnn" for c in gpu)
    assert not encoder_self["is_causal"] and decoder_self["is_causal"] and not cross["is_causal"]
    np.testing.assert_array_equal(encoder_self["key_value_seq_lengths"], enc_lengths)
    np.testing.assert_array_equal(decoder_self["query_seq_lengths"], dec_lengths)
    np.testing.assert_array_equal(cross["query_seq_lengths"], dec_lengths)
    np.testing.assert_array_equal(cross["key_value_seq_lengths"], enc_lengths)
    dense = dense_model(*args)
    for row, length in enumerate(dec_lengths):  # padded targets' logits are never read
        np.testing.assert_allclose(fused[row, :length], dense[row, :length], atol=1e-6)


def test_cache_decoding_falls_back_and_off_gpu_auto_is_einsum(gpu, monkeypatch):
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    model.decode(tokens(), jnp.broadcast_to(jnp.arange(12), (2, 12)), model.init_cache(2, 16))
    assert [c["implementation"] for c in gpu] == ["xla"]
    monkeypatch.setattr(kernels, "backend", lambda: "cpu")
    model(tokens())
    assert len(gpu) == 1  # einsum: no dot_product_attention call


def test_grouped_matmul_auto_follows_the_backend_table(monkeypatch):
    for backend, expected in (("gpu", "ragged_dot"), ("tpu", "ragged_dot"), ("cpu", "blocks")):
        monkeypatch.setattr(kernels, "backend", lambda b=backend: b)
        assert kernels.select_grouped_matmul("auto") == expected
        assert kernels.select_grouped_matmul("blocks") == "blocks"
    assert "NOT YET MEASURED" in kernels.GROUPED_MATMUL["gpu"][1]


REMAT = [p for p in typing.get_args(typing.get_type_hints(ModelConfig)["remat"]) if p != "none"]


def loss_and_grads(cfg, x):
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params):
        total, count = causal_lm_loss(nnx.merge(graphdef, params)(x[:, :-1]), x[:, 1:], jnp.ones(x[:, 1:].shape))
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


def test_every_remat_policy_gives_the_loss_and_gradients_of_none():
    cfg = dataclasses.replace(CFG, dtype="float32", d_model=16, d_ff=32, n_heads=2, n_kv_heads=1)
    x = tokens(2, 9)
    loss, grads = loss_and_grads(cfg, x)
    for policy in REMAT:
        policy_loss, policy_grads = loss_and_grads(dataclasses.replace(cfg, remat=policy), x)
        np.testing.assert_allclose(policy_loss, loss, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy), policy_grads, grads)


@pytest.mark.parametrize("policy, named", [
    ("save_qkv_proj", {"query_proj", "key_proj", "value_proj"}),
    ("save_out_proj", {"out_proj"}),
    ("save_dot_except_mlp", {"query_proj", "key_proj", "value_proj", "context", "out_proj"}),
    ("minimal_with_context", {"context"}),
])
def test_named_policies_keep_the_outputs_they_name(policy, named, capsys):
    cfg = dataclasses.replace(CFG, dtype="float32", attention="einsum")
    graphdef, params = nnx.split(Block(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = attention_mask(jnp.ones((2, 8), jnp.int32), causal=True)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, positions, mask))

    print_saved_residuals(jax.checkpoint(loss, policy=REMAT_POLICIES[policy]), params, x)
    saved = set(re.findall(r"named '(\w+)'", capsys.readouterr().out))
    assert named <= saved and (policy == "minimal_with_context" or saved == named), saved
