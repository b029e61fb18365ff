"""Context parallelism (`mesh.context`): the sequence split over devices equals one device.

The equivalence runs in subprocesses with 8 CPU devices (XLA_FLAGS set before jax is imported):
loss and gradients of a tiny 4-layer decoder (sliding-window layers 0 and 2, global layers 1
and 3) on context 2 x data 2 x tensor 2, of a T5-style encoder-decoder (relative position
biases) on context 4 x fsdp 2, and of the decoder with MoE layers 1 and 3 (dropless) and XLA's
attention kernel on context 2 x pipeline 2 x expert 2, each of a batch of packed documents (the
decoder's: one row a single whole sequence) laid out by `global_batch` (the load-balanced
order), against the same model and batch on one device in natural order. Between them every
mesh axis is split along with context. The bad layouts are checked on abstract meshes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags
from jax.sharding import AbstractMesh

from lmjax.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig
from lmjax.parallel import MESH_AXES, load_balanced_order, mesh_axis_sizes, validate_layout

EQUIVALENCE = """
import json, sys, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from lmjax.config import MeshConfig, ModelConfig, MoEConfig
from lmjax.families import family_of
from lmjax.parallel import batch_sharding, global_batch, make_mesh, natural_order, state_shardings

def documents(starts):  # (rows, length) bool, True where a document starts -> segment ids, positions
    index = np.arange(starts.shape[1])
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return np.cumsum(starts, axis=1).astype(np.int32), positions.astype(np.int32)

def packed_batch(rows, length, seed, encoder=False):  # encoder: + encoder inputs of 2 x length, same documents
    rng = np.random.default_rng(seed)
    starts = np.zeros((rows, length), bool)
    starts[:, 0] = True
    starts[np.arange(rows)[:, None], rng.integers(1, length, (rows, 3))] = True  # up to 4 documents a row
    segment_ids, positions = documents(starts)
    tokens = rng.integers(0, 64, (rows, length + 1)).astype(np.int32)
    loss_mask = (segment_ids == np.roll(segment_ids, -1, axis=1)).astype(np.float32)  # not across documents
    loss_mask[:, -1] = 1.0
    if not encoder:
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
                "segment_ids": segment_ids, "loss_mask": loss_mask}
    encoder_starts = np.zeros((rows, 2 * length), bool)
    encoder_starts[:, ::2] = starts
    encoder_segment_ids, encoder_positions = documents(encoder_starts)
    return {"encoder_inputs": rng.integers(0, 64, (rows, 2 * length)).astype(np.int32),
            "encoder_segment_ids": encoder_segment_ids, "encoder_positions": encoder_positions,
            "decoder_inputs": tokens[:, :-1], "targets": tokens[:, 1:], "decoder_positions": positions,
            "decoder_segment_ids": segment_ids, "loss_mask": loss_mask}

def loss_and_grads(graphdef, params, batch):
    def loss(params):
        model = nnx.merge(graphdef, params)
        losses = family_of(model.cfg).token_losses(model, batch)
        return jnp.sum(losses) / jnp.sum(batch["loss_mask"])
    return jax.value_and_grad(loss)(params)

def compare(model, cfg, layouts, batch):  # {model layout: loss and gradient differences} against one device
    graphdef, params = nnx.split(family_of(cfg).build(cfg, nnx.Rngs(0)))
    step = jax.jit(loss_and_grads, static_argnums=0)
    want = step(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
    results = {}
    for axes in layouts:
        mesh = make_mesh(MeshConfig(**axes))
        with jax.set_mesh(mesh):
            sharded = jax.device_put(params, state_shardings(params, mesh))
            laid_out = global_batch(batch, batch_sharding(mesh), len(batch["targets"]))
            got = step(graphdef, sharded, laid_out)
        key = "positions" if "positions" in batch else "decoder_positions"
        assert not np.array_equal(np.asarray(laid_out[key]), batch[key])  # reordered on the devices
        assert np.array_equal(natural_order(np.asarray(laid_out[key]), mesh), batch[key])  # and back
        errors = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]))]
        results[f"{model} {axes}"] = {"loss": [float(got[0]), float(want[0])], "grad_errors": errors}
    return results

batch = packed_batch(4, 64, 1)
batch["segment_ids"][0], batch["positions"][0], batch["loss_mask"][0] = 1, np.arange(64), 1.0  # one whole document
results = {}
for model, layouts in json.loads(sys.argv[1]).items():
    moe = model == "moe"  # MoE layers 1 and 3 (dropless), attention by XLA's kernel instead of the einsum
    kind = dict(sliding_window=12, global_every=2,  # windows: layers 0 and 2
                moe=MoEConfig(n_experts=4, top_k=2, every=2) if moe else MoEConfig())
    if model.startswith("encoder"):  # T5 relative position biases, no windows
        kind = dict(family=model, position="relative", n_decoder_layers=2 if model == "encoder_decoder" else None)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=64,
                      dtype="float32", param_dtype="float32", attention="dot_product" if moe else "einsum", **kind)
    results.update(compare(model, cfg, layouts, packed_batch(4, 32, 2, True) if model == "encoder_decoder" else batch))
print(json.dumps(results))
"""


# the layouts of 8 devices checked, by model: between them every mesh axis is split along with context
LAYOUTS = {"dense": [dict(data=2, tensor=2, context=2)], "encoder_decoder": [dict(data=1, fsdp=2, context=4)],
           "moe": [dict(data=1, pipeline=2, expert=2, context=2)]}


@pytest.mark.parametrize("model", LAYOUTS)
def test_context_parallel_loss_and_gradients_equal_one_device(model):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", EQUIVALENCE, json.dumps({model: LAYOUTS[model]})], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == len(LAYOUTS[model])
    for name, result in results.items():
        got, want = result["loss"]
        assert abs(got - want) <= 1e-5 * abs(want), (name, got, want)
        assert max(result["grad_errors"]) <= 1e-5, (name, result["grad_errors"])


def test_load_balanced_order_gives_each_device_an_equal_share_of_the_triangle():
    order = load_balanced_order(16, 4)  # 8 chunks of 2: device i holds chunks i and 7 - i
    assert sorted(order) == list(range(16))
    assert order.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    causal_pairs = [sum(q + 1 for q in shard) for shard in order.reshape(4, 4)]  # keys each device's queries see
    assert len(set(causal_pairs)) == 1
    natural = [sum(q + 1 for q in shard) for shard in np.arange(16).reshape(4, 4)]
    assert max(natural) / min(natural) > 5  # without the reorder, the last device does 5x the first's work


@pytest.mark.parametrize("settings, message", [
    (dict(data=DataConfig(seq_len=36)), "data.seq_len=36 does not split into 2 x 4 equal chunks"),
    (dict(model=ModelConfig(family="encoder_decoder", n_decoder_layers=2, position="relative")),
     "the 58 target positions of each example"),  # an encoder-decoder's targets split too
])
def test_bad_context_layouts_are_refused_before_compiling(settings, message):
    with pytest.raises(ConfigError, match=message):  # the config's own checks, or the layout's on the 8 devices
        cfg = Config(**{"mesh": MeshConfig(data=2, context=4), **settings})
        validate_layout(cfg, AbstractMesh(tuple(mesh_axis_sizes(cfg.mesh, 8)), MESH_AXES))


def test_plan_counts_context_parallel_memory_and_traffic_by_hand():
    from lmjax.scaling.memory import memory_estimate

    model = ModelConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=1024, remat="none")
    one = Config(model=model, data=DataConfig(seq_len=1024), mesh=MeshConfig(data=1))
    split = Config(model=model, data=DataConfig(seq_len=1024), mesh=MeshConfig(data=1, context=4))
    alone, shared = memory_estimate(one, 1), memory_estimate(split, 4)
    rows = one.train.batch_size  # every row on every device: data 1
    kv = rows * 1024 * 2 * 2 * 16 * 4 * 3 / 4  # rows x T x (k, v) x kv_heads x head_dim x float32 x (n-1)/n
    assert shared["memory_context_kv_bytes"] == kv * 3  # remat none: kept for each of the 3 layers
    assert shared["context_comm_bytes_per_step"] == kv * 3 * 3  # gather + gradient all-reduce, 3 layers
    assert shared["memory_activations_bytes"] == pytest.approx(alone["memory_activations_bytes"] / 4 + kv * 3)
    assert "memory_context_kv_bytes" not in alone and shared["memory_weights_bytes"] == alone["memory_weights_bytes"]
    # 3 stages, one layer each, M = 3 microbatches: each device gathers for its layer on every microbatch and
    # on the bubble's 2 idle steps, 5 layer passes of a third of the rows: kv x 5/3
    staged = memory_estimate(Config(model=model, data=DataConfig(seq_len=1024),
                                    mesh=MeshConfig(pipeline=3, data=1, context=4)), 12)
    assert staged["memory_context_kv_bytes"] == pytest.approx(kv * 5 / 3)
    assert staged["context_comm_bytes_per_step"] == pytest.approx(kv * 3 * 5 / 3)


def test_a_context_group_spanning_processes_is_refused(tmp_path):
    """Two processes of 4 devices with mesh.context=8: each would hold half of every row's
    positions, which `global_batch` cannot load; both exit 2 with one line before compiling, and
    the run directory is not made."""
    from test_parallel import TINY, free_port, lmjax_subprocess, mesh_args

    run, port = tmp_path / "run", free_port()
    processes = [lmjax_subprocess(["train", *TINY, *mesh_args(data=1, context=8), "--set", f"train.run_dir={run}",
                                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i)], devices=4) for i in range(2)]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 2, output
        assert "lmjax: error: context parallelism (mesh.context=8) spans processes" in output, output
        assert "Traceback" not in output
    assert not run.exists()
