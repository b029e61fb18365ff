"""Quantization-aware training through qwix's QtProvider (`--set quant.weights=int8`): the
forward pass fake-quantizes every matrix a matmul reads, gradients reach every weight, a QAT
run resumes exactly, and `lmjax quantize` of it gives its forward pass in int8."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from conftest import tiny_config, xla_flags
from flax import nnx

from lmjax.adapters.int8 import groups
from lmjax.adapters.qat import QAT
from lmjax.cli import main
from lmjax.config import QuantConfig
from lmjax.families import family_of
from lmjax.records import read_metrics
from lmjax.runs import load_config, restore_weights, train
from lmjax.train.state import abstract_model

INT8 = QuantConfig(weights="int8")


def fake_quantized(params: nnx.State, roles: tuple[str, ...]) -> nnx.State:
    """`params` with each matrix of a role in `roles` replaced by its int8 round trip, one
    absmax scale per output unit of each layer and expert (the groups `lmjax quantize` uses,
    `lmjax.adapters.int8.groups`), computed eagerly on the stacked weights."""
    flat = []
    for path, weight in nnx.to_flat_state(params):
        channelwise = groups(weight, "channel")
        if channelwise is not None and weight.get_metadata()["role"] in roles:
            rounded = qwix.dequantize(qwix.quantize(weight.get_value(), jnp.int8, channelwise_axes=channelwise))
            weight = weight.replace(rounded)
        flat.append((path, weight))
    return nnx.from_flat_state(flat)


def _configs():
    """Untied heads (a tied table is looked up in float and fake-quantized only as the head).
    A decoder with a dense layer, a capacity-routed MoE layer and a shared expert; BERT's
    encoder (biases, MLM head transform); T5's encoder-decoder (cross-attention)."""
    base = dataclasses.replace(tiny_config("unused").model, tie_embeddings=False)
    return {
        "moe_decoder": dataclasses.replace(base, moe=dataclasses.replace(base.moe, n_experts=4, top_k=2, every=2,
                                                                         n_shared_experts=1, dispatch="capacity")),
        "encoder": dataclasses.replace(base, family="encoder", position="learned", token_types=2, bias=True,
                                       norm="layernorm", norm_placement="post", embed_norm=True,
                                       mlm_head_transform=True),
        "encoder_decoder": dataclasses.replace(base, family="encoder_decoder", position="relative",
                                               n_decoder_layers=1),
    }


def _logits(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    return model(tokens, tokens[:, ::-1]) if model.cfg.family == "encoder_decoder" else model(tokens)


@pytest.mark.parametrize("name", list(_configs()))
def test_the_qat_forward_fake_quantizes_every_hidden_and_output_matrix(name):
    """The QAT model's logits equal the float model's with every hidden and output matrix
    (attention, MLP, experts, router, head) replaced by its int8 round trip, so a weight qwix
    failed to find would show; and they differ from the float logits."""
    cfg = _configs()[name]
    params = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 16)))
    logits = jax.jit(_logits, static_argnums=0)
    qat = np.asarray(logits(abstract_model(cfg, (QAT(INT8),))[0], params, tokens))
    graphdef = abstract_model(cfg)[0]
    np.testing.assert_allclose(qat, logits(graphdef, fake_quantized(params, ("hidden", "output")), tokens),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(qat, logits(graphdef, params, tokens), rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    """A QAT run stopped at step 3 and resumed to step 6, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("qat")
    cfg = tiny_config(root / "resumed", steps=6, eval_every=100, eval_batches=1, sample_tokens=0, checkpoint_every=3)
    cfg = dataclasses.replace(cfg, quant=INT8, model=dataclasses.replace(cfg.model, tie_embeddings=False))
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, halt_at_step=3)), root / "resumed")
    train(cfg, root / "resumed")
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(root / "whole"))), root / "whole")
    return root


def test_a_qat_run_learns_and_resumes_exactly(qat_runs):
    whole, resumed = read_metrics(qat_runs / "whole"), read_metrics(qat_runs / "resumed")
    losses = [r["loss"] for r in whole if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["loss"] for r in resumed if "loss" in r][-3:] == losses[-3:]
    for a, b in zip(jax.tree.leaves(restore_weights(qat_runs / "whole")[2]),
                    jax.tree.leaves(restore_weights(qat_runs / "resumed")[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_reach_every_weight_through_the_fake_quantization(qat_runs):
    """qwix's straight-through estimator: every parameter of the QAT model gets a nonzero
    gradient, within a few percent of the float model's at the same weights."""
    cfg, _, params, _, _ = restore_weights(qat_runs / "whole")
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 256, (4, 32)))

    def grads(graphdef):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
        return dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(params)))

    qat, ref = grads(abstract_model(cfg.model, (QAT(cfg.quant),))[0]), grads(abstract_model(cfg.model)[0])
    for path, g in qat.items():
        g, r = np.asarray(g.get_value()), np.asarray(ref[path].get_value())
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
        assert np.linalg.norm(g - r) < 0.1 * np.linalg.norm(r), path


def test_lmjax_quantize_of_a_qat_run_gives_its_forward_in_int8(qat_runs, tmp_path):
    """The quantized run's logits equal the QAT forward's once the looked-up tables (which
    QAT leaves in float, and `lmjax quantize` stores in int8 too) are rounded the same way."""
    assert main(["quantize", str(qat_runs / "whole"), "--out", str(tmp_path / "int8")]) == 0
    assert load_config(tmp_path / "int8").quant.weights == "int8"
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 256, (2, 16)))
    logits = jax.jit(_logits, static_argnums=0)
    cfg, qat_graphdef, params, _, _ = restore_weights(qat_runs / "whole")
    _, graphdef, int8, _, _ = restore_weights(tmp_path / "int8", keep_int8=True)
    np.testing.assert_allclose(logits(graphdef, int8, tokens),
                               logits(qat_graphdef, fake_quantized(params, ("input",)), tokens), rtol=1e-5, atol=1e-5)


EXPERT_SHARDED = """
import sys, jax, numpy as np
from flax import nnx
from lmjax.config import MeshConfig
from lmjax.parallel import make_mesh, state_shardings
from lmjax.train.state import abstract_model
from test_qat import INT8, _configs, _logits
cfg = _configs()["moe_decoder"]
from lmjax.adapters.qat import QAT
graphdef, abstract = abstract_model(cfg, (QAT(INT8),))
params = nnx.from_flat_state([(k, v.replace(np.load(sys.argv[1])[str(i)]))
                              for i, (k, v) in enumerate(nnx.to_flat_state(abstract))])
mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=4))
with jax.set_mesh(mesh):
    params = jax.device_put(params, state_shardings(abstract, mesh))
    experts = dict(nnx.to_flat_state(params))[("stack", "moe_blocks", "moe", "w_up")]
    assert experts.get_value().addressable_shards[0].data.shape[1] == cfg.moe.n_experts // 4
    np.save(sys.argv[2], np.asarray(jax.jit(_logits, static_argnums=0)(graphdef, params, np.load(sys.argv[3]))))
"""


def test_qat_sees_the_experts_when_they_are_sharded(tmp_path):
    """Capacity-routed experts split over an `expert` mesh axis (4 of 8 CPU devices, fsdp 2):
    the QAT logits still equal the one-device fake-quantized reference's, so qwix finds the
    expert weights whatever their per-device shape."""
    cfg = _configs()["moe_decoder"]
    params = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 16)).astype(np.int32)
    np.savez(tmp_path / "params.npz", **{str(i): np.asarray(v.get_value())
                                         for i, (_, v) in enumerate(nnx.to_flat_state(params))})
    np.save(tmp_path / "tokens.npy", tokens)
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", EXPERT_SHARDED, str(tmp_path / "params.npz"), str(tmp_path / "qat.npy"),
                    str(tmp_path / "tokens.npy")], env=env, check=True)
    reference = jax.jit(_logits, static_argnums=0)(abstract_model(cfg)[0], fake_quantized(params, ("hidden", "output")),
                                                   jnp.asarray(tokens))
    np.testing.assert_allclose(np.load(tmp_path / "qat.npy"), reference, rtol=1e-5, atol=1e-6)


def test_a_qat_encoder_decoder_trains(tmp_path):
    """`lmjax train t5_tiny_span --set quant.weights=int8` (cross-attention, relative position
    bias, tied embeddings) runs its steps on one device with a finite loss: qwix tells every
    matmul's weight from its activation, even where the decoder's (B, T, D) = (4, 8, 32) activations
    have the shape of the attention output projection (N, H, D)."""
    assert main(["train", "t5_tiny_span", "--set", "quant.weights=int8", "--set", "model.d_model=32",
                 "--set", "model.n_layers=1", "--set", "model.n_decoder_layers=1", "--set", "train.steps=2",
                 "--set", "train.batch_size=4", "--set", "data.seq_len=32", "--set", "train.eval_every=100",
                 "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0",
                 "--set", f"train.run_dir={tmp_path}"]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses and np.all(np.isfinite(losses))
