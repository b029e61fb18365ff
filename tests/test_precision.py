"""bfloat16 parameters with float32 master weights held by the optimizer (optim.master_weights)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.checkpoint import Checkpointer
from lmjax.config import Config, ConfigError, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from lmjax.parallel import make_mesh
from lmjax.scaling.counting import param_counts
from lmjax.scaling.memory import memory_estimate
from lmjax.train.optimizer import MasterWeightsState, learning_rate_schedule, make_optimizer
from lmjax.train.state import abstract_train_state, init_train_state
from lmjax.train.step import make_train_step

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=None)


def trainer(model, optim, steps=100):
    """(initial TrainState, jitted step) of `model` trained with `optim` on one device."""
    mesh = make_mesh(MeshConfig())
    make = lambda params: make_optimizer(optim, steps, params)  # noqa: E731
    graphdef, state, shardings, optimizer = init_train_state(model, make, 0, mesh)
    return state, make_train_step(graphdef, optimizer, learning_rate_schedule(optim, steps), 1, False)


def batches(n, rows=8, length=16):
    """n batches (stacked) of sequences that count up from a random start (mod 64): learnable
    in a few dozen steps."""
    start = jax.random.randint(jax.random.key(0), (n, rows, 1), 0, 64)
    tokens = (start + jnp.arange(length + 1)) % 64
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "positions": jnp.broadcast_to(jnp.arange(length), (n, rows, length)),
            "loss_mask": jnp.ones((n, rows, length), jnp.float32)}


def norm_scales(params) -> np.ndarray:
    """The norm scales of host (numpy) params, as float32."""
    return np.concatenate([np.asarray(params["stack"]["blocks"][n]["scale"], np.float32).ravel()
                           for n in ("attn_norm", "mlp_norm")])


def run(state, step, data):
    """Yield the host copy (numpy) of the state and the metrics after each step over the stacked
    batches; each step is one call of the jitted step, so the params are stored in their dtype."""
    step = jax.jit(step)
    for i in range(len(data["inputs"])):
        state, metrics, _ = step(state, jax.tree.map(lambda x, i=i: x[i], data))
        yield jax.device_get(nnx.to_pure_dict(state.params)), jax.device_get(state), jax.device_get(metrics)


def test_updates_below_one_bfloat16_step_accumulate_in_the_master_copy():
    # Adam moves each weight by about lr = 1e-3 per step; the norm scales start at 1.0, where one
    # bfloat16 step is 2**-7 = 0.0078: a single update is lost in bfloat16 unless accumulated.
    bf16 = dataclasses.replace(MODEL, param_dtype="bfloat16")
    data = jax.tree.map(lambda x: np.stack([x[0]] * 8), batches(1))  # one batch, 8 steps
    state, step = trainer(bf16, dataclasses.replace(OPTIM, master_weights=True))
    assert isinstance(state.opt_state, MasterWeightsState)
    for i, (params, host, _) in enumerate(run(state, step, data)):
        master = nnx.to_pure_dict(host.opt_state.master)
        rounded = jax.tree.map(lambda m, p: np.array_equal(m.astype(p.dtype), p), master, params)
        assert all(jax.tree.leaves(rounded))  # the params are the master copy rounded to bfloat16
        if i == 0:  # one update: kept in the master copy only
            assert np.all(norm_scales(params) == 1.0) and np.all(norm_scales(master) != 1.0)
    assert np.mean(norm_scales(params) != 1.0) > 0.5  # accumulated past half a bfloat16 step: the weights moved
    plain_state, plain_step = trainer(bf16, OPTIM)
    for params, _, _ in run(plain_state, plain_step, data):
        assert np.all(norm_scales(params) == 1.0)  # without master weights every update is rounded away


def test_fifty_steps_track_the_float32_run():
    # Both runs start from the same weights (the float32 init rounded to bfloat16), so the only
    # difference is where the weights are stored: float32, or bfloat16 with a float32 master copy.
    data = batches(50)
    fp32_state, fp32_step = trainer(MODEL, dataclasses.replace(OPTIM, lr=1e-2))
    start = jax.tree.map(lambda p: p.astype(jnp.bfloat16), fp32_state.params)
    fp32_state = fp32_state._replace(params=jax.tree.map(lambda p: p.astype(jnp.float32), start))
    bf16_state, bf16_step = trainer(dataclasses.replace(MODEL, param_dtype="bfloat16"),
                                    dataclasses.replace(OPTIM, lr=1e-2, master_weights=True))
    master = MasterWeightsState(fp32_state.params, bf16_state.opt_state.inner)  # Adam's moments start at zero
    bf16_state = bf16_state._replace(params=start, opt_state=master)
    fp32 = np.array([float(metrics["loss"]) for _, _, metrics in run(fp32_state, fp32_step, data)])
    bf16 = np.array([float(metrics["loss"]) for _, _, metrics in run(bf16_state, bf16_step, data)])
    assert fp32[-1] < 0.2 * fp32[0]  # it learned: 4.2 -> below 0.84 nats
    np.testing.assert_allclose(bf16, fp32, atol=0.03)  # bfloat16 weights in the forward pass: within 0.03 nats


def test_memory_and_checkpoint_hold_the_master_copy(tmp_path):
    with pytest.raises(ConfigError, match="master_weights"):
        Config(optim=OptimConfig(master_weights=True))
    model = dataclasses.replace(MODEL, param_dtype="bfloat16")
    cfg = Config(model=dataclasses.replace(model, vocab_size=384, max_seq_len=256),
                 optim=OptimConfig(master_weights=True), train=TrainConfig(batch_size=8, steps=1))
    memory, params = memory_estimate(cfg), param_counts(cfg.model)["params_total"]
    assert memory["memory_weights_bytes"] == 2 * params and memory["memory_master_weights_bytes"] == 4 * params
    assert memory["memory_adam_bytes"] == 8 * params  # float32 moments
    optim = dataclasses.replace(OPTIM, master_weights=True)
    state, step = trainer(model, optim)
    state = jax.jit(step)(state, jax.tree.map(lambda x: x[0], batches(1)))[0]
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, state, {}, cfg.to_dict())
    _, abstract, _ = abstract_train_state(model, lambda p: make_optimizer(optim, 100, p), make_mesh(MeshConfig()))
    restored = checkpointer.restore(abstract)[0]
    checkpointer.close()
    for saved, back in zip(jax.tree.leaves(state.opt_state.master), jax.tree.leaves(restored.opt_state.master)):
        assert back.dtype == jnp.float32
        np.testing.assert_array_equal(back, saved)
