"""int8 post-training weight quantization with qwix: error bound, perplexity, bytes, int8 in
memory, CLI."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, xla_flags
from flax import nnx
from safetensors.numpy import load_file

import lmjax
from lmjax import generate
from lmjax.adapters.int8 import QUANTIZED_FILE, Int8Weight, groups, load_params, quantize_params, resident_bytes
from lmjax.adapters.lora import path_name
from lmjax.cli import main, transform_bytes
from lmjax.config import MeshConfig, QuantConfig
from lmjax.families import family_of
from lmjax.parallel import make_mesh
from lmjax.runs import evaluate_run, load_config, restore_weights, train
from lmjax.scaling.plan import plan
from lmjax.train.state import abstract_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained float run and its int8 quantization (per channel), written by the CLI."""
    root = tmp_path_factory.mktemp("quant")
    cfg = tiny_config(root / "float", steps=30, eval_every=100, eval_batches=2, sample_tokens=0, checkpoint_every=100)
    train(cfg, root / "float")
    assert main(["quantize", str(root / "float"), "--out", str(root / "int8")]) == 0
    return root


def test_each_matmul_stays_within_the_rounding_bound(runs):
    """|x W_q - x W| <= sum_i |x_i| max_i |W_ij| / 255 for every output j (half a quantization
    step of the column's absmax scale), at every layer; vectors are stored exactly."""
    _, _, before, _, _ = restore_weights(runs / "float")
    _, _, after, _, _ = restore_weights(runs / "int8")
    after = dict(nnx.to_flat_state(after))
    matrices = 0
    for path, weight in nnx.to_flat_state(before):
        w, q = np.asarray(weight[...], np.float64), np.asarray(after[path][...], np.float64)
        channelwise = groups(weight, "channel")
        if channelwise is None:
            np.testing.assert_array_equal(q, w)
            continue
        matrices += 1
        reduced = tuple(a for a in range(w.ndim) if a not in channelwise)
        w2, q2 = (np.moveaxis(a, reduced, range(len(reduced))).reshape(int(np.prod([w.shape[r] for r in reduced])), -1)
                  for a in (w, q))  # (reduced, channels)
        x = np.random.default_rng(0).normal(size=(7, w2.shape[0]))
        bound = np.abs(x) @ np.abs(w2).max(axis=0, keepdims=True).repeat(w2.shape[0], 0) / 255
        assert np.all(np.abs(x @ q2 - x @ w2) <= bound + 1e-9), path_name(path)
        assert not np.array_equal(q, w)
    assert matrices >= 8


def test_validation_perplexity_rises_less_than_two_percent(runs):
    base, quantized = evaluate_run(runs / "float"), evaluate_run(runs / "int8")
    assert quantized["perplexity"] != base["perplexity"]
    assert quantized["perplexity"] < 1.02 * base["perplexity"]


def test_saved_weights_are_a_quarter_of_float32(runs):
    """The int8 values are exactly 1/4 of the matrices' float32 bytes; the scales add one
    float32 per output unit (here per 32 or more weights: at most 1/32 more, shrinking as
    1/width); vectors stay float32. This tiny model (d_model 32) saves 28% of its float32 bytes."""
    saved = load_file(str(runs / "int8" / QUANTIZED_FILE))
    _, _, params, _, _ = restore_weights(runs / "float")
    matrix_bytes = sum(np.asarray(v[...]).nbytes for _, v in nnx.to_flat_state(params) if groups(v, "channel"))
    vector_bytes = sum(np.asarray(v[...]).nbytes for _, v in nnx.to_flat_state(params) if not groups(v, "channel"))
    values = sum(a.nbytes for k, a in saved.items() if k.endswith(".qvalue"))
    scales = sum(a.nbytes for k, a in saved.items() if k.endswith(".scale"))
    assert all(a.dtype == np.int8 for k, a in saved.items() if k.endswith(".qvalue"))
    assert 4 * values == matrix_bytes and 0 < 32 * scales <= matrix_bytes
    assert sum(a.nbytes for a in saved.values()) == values + scales + vector_bytes


def test_load_generate_and_eval_accept_a_quantized_run(runs, capsys):
    model, cfg, _ = lmjax.load(runs / "int8")
    assert cfg.quant.weights == "int8" and cfg.quant.granularity == "channel"
    assert main(["generate", str(runs / "int8"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert "MiB resident (int8 matrices" in capsys.readouterr().err
    assert main(["eval", str(runs / "int8"), "--max-batches", "1", "--json"]) == 0


@pytest.mark.parametrize("args, message", [
    (["quantize", "{int8}", "--out", "{tmp}/again"], "already quantized"),
    (["quantize", "{float}", "--out", "{tmp}/four", "--bits", "4"], "int8 weights only"),
    (["train", "--set", "quant.weights=int8", "--set", "model.moe.n_experts=4", "--set", "train.run_dir={tmp}/qat"],
     "use model.moe.dispatch=capacity"),
    (["train", "--set", "quant.weights=int8", "--set", "quant.granularity=tensor", "--set",
      "train.run_dir={tmp}/qat"], "use quant.granularity=channel"),
])
def test_bad_input_is_one_clear_line(runs, capsys, tmp_path, args, message):
    args = [a.format(int8=runs / "int8", float=runs / "float", tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def _family_configs():
    """One tiny model per family and feature the int8 path reads differently: RoPE and a tied
    head; BERT's learned positions, token types and MLM head; T5's relative-bias tables and an
    untied head; MoE router and experts (read once at the layer's entry, before any dispatch)
    and a shared expert beside a dense layer."""
    base = tiny_config("unused").model
    return {
        "decoder": base,
        "encoder": dataclasses.replace(base, family="encoder", position="learned", token_types=2, bias=True,
                                       norm="layernorm", norm_placement="post", embed_norm=True,
                                       mlm_head_transform=True),
        "encoder_decoder": dataclasses.replace(base, family="encoder_decoder", position="relative",
                                               tie_embeddings=False, n_decoder_layers=1),
        "moe": dataclasses.replace(base, moe=dataclasses.replace(base.moe, n_experts=4, top_k=2, every=2,
                                                                 n_shared_experts=1)),
    }


def _forward(model, tokens):
    if model.cfg.family == "encoder_decoder":
        return model(tokens, tokens[:, ::-1])
    return model(tokens)


@pytest.mark.parametrize("name", list(_family_configs()))
def test_int8_weights_stay_int8_in_memory_and_give_the_dequantized_logits(name):
    """Loaded with `keep_int8`, every matrix is an `Int8Weight` of int8 values (exactly 1/4 of its
    float32 bytes) and float32 scales, and the model's logits (forward, and the decoder's
    KV-cache decoding) equal those of the same weights dequantized on load into float32."""
    cfg = _family_configs()[name]
    params = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)))
    tensors = quantize_params(params, "channel")
    graphdef, abstract = abstract_model(cfg)
    mesh = make_mesh(MeshConfig())
    int8, dequantized = (load_params(tensors, abstract, mesh, keep_int8=k) for k in (True, False))
    matrices = [v.get_value() for _, v in nnx.to_flat_state(int8) if isinstance(v.get_value(), Int8Weight)]
    assert len(matrices) == sum(groups(v, "channel") is not None for _, v in nnx.to_flat_state(params))
    assert all(m.qvalue.dtype == jnp.int8 and m.scale.dtype == jnp.float32 for m in matrices)
    assert 4 * sum(m.qvalue.nbytes for m in matrices) == sum(
        v.get_value().nbytes for _, v in nnx.to_flat_state(params) if groups(v, "channel") is not None)
    assert resident_bytes(int8) < 0.4 * resident_bytes(dequantized)

    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 16)))
    forward = jax.jit(lambda p, t: _forward(nnx.merge(graphdef, p), t))
    expected = np.asarray(forward(dequantized, tokens))
    np.testing.assert_allclose(np.asarray(forward(int8, tokens)), expected, rtol=1e-5, atol=1e-5)
    if name == "decoder":  # KV-cache decoding: prefill, then one token per step
        new = [generate.generate(nnx.merge(graphdef, p), [np.arange(1, 9), np.arange(3, 7)], 6, temperature=0.0)
               for p in (int8, dequantized)]
        assert all(np.array_equal(a, b) for a, b in zip(*new))


SHARDED_LOGITS = """
import sys, numpy as np, jax
from flax import nnx
from lmjax.adapters.int8 import Int8Weight
from lmjax.runs import restore_weights
_, graphdef, params, _, _ = restore_weights(sys.argv[1], mesh_overrides=["fsdp=8"], keep_int8=True)
leaves = [v.get_value() for _, v in nnx.to_flat_state(params)]
assert any(isinstance(w, Int8Weight) and len(w.qvalue.sharding.device_set) == 8
           and w.qvalue.addressable_shards[0].data.size * 8 == w.qvalue.size for w in leaves)
tokens = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)))
"""


def test_an_fsdp_sharded_int8_load_gives_the_one_device_logits(runs, tmp_path):
    """The int8 values split over 8 devices (fsdp; scales of size 1 along a split axis stay
    whole), and the model's logits equal those of the one-device load."""
    tokens = np.random.default_rng(1).integers(1, 256, (2, 16)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", SHARDED_LOGITS, str(runs / "int8"), str(tmp_path / "tokens.npy"),
                    str(tmp_path / "sharded.npy")], env=env, check=True)
    model, _, _ = lmjax.load(runs / "int8")
    expected = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    np.testing.assert_allclose(np.load(tmp_path / "sharded.npy"), expected, rtol=1e-5, atol=1e-5)


def test_plan_reports_the_int8_weight_bytes_of_the_saved_run(runs):
    """`lmjax plan --set quant.weights=int8` counts the bytes `lmjax quantize` saved (values,
    scales, float vectors), on the config alone; a float config's plan has no int8 lines."""
    saved = load_file(str(runs / "int8" / QUANTIZED_FILE))
    cfg = load_config(runs / "float")
    assert "memory_int8_weights_bytes" not in plan(cfg)
    int8_cfg = dataclasses.replace(cfg, quant=QuantConfig(weights="int8"))
    int8 = plan(int8_cfg, **transform_bytes(int8_cfg))
    assert int8["memory_int8_weights_bytes"] == sum(a.nbytes for a in saved.values())
    assert int8["memory_int8_inference_bytes"] - int8["memory_int8_weights_bytes"] == (
        int8["memory_inference_bytes"] - int8["memory_weights_bytes"])
