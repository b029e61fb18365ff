"""The MoE layer against a naive per-token loop, capacity drops, gradients, training."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from flax import nnx
from test_generate import greedy_without_cache

from lmjax.config import Config, ModelConfig, MoEConfig
from lmjax.config_parse import override
from lmjax.models.lm import DecoderLM
from lmjax.models.moe import MoE, expert_capacity, pop_routing_statistics


def moe_config(**moe) -> ModelConfig:
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=24, moe=MoEConfig(**{"n_experts": 4, **moe}))


def encoder_moe_config(**moe) -> ModelConfig:
    """An encoder whose MoE layers route by expert choice."""
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=24, family="encoder",
                       moe=MoEConfig(**{"n_experts": 4, "routing": "experts_choose", "dispatch": "capacity", **moe}))


def layer_output(layer: MoE, x, *args):
    """The layer's output and the routing statistics it sowed (one jit: quicker than op by op)."""
    y, sown = _forward(layer, x, *args)
    return np.asarray(y), sown["routing"]


@nnx.jit
def _forward(layer: MoE, x, *args):
    y = layer(x, *args)
    return y, nnx.to_pure_dict(nnx.pop(layer, nnx.Intermediate))


def naive_moe(layer: MoE, x, mlp: str, kept=None):
    """For each token t: sum_k w_k * Expert_{e_k}(x_t) (+ shared experts), as a plain loop in
    float64 numpy. `kept[t, k]` False drops that assignment."""
    x = np.asarray(x, np.float64)
    router = np.asarray(layer.router[...], np.float64)
    w_up, w_down = np.asarray(layer.w_up[...], np.float64), np.asarray(layer.w_down[...], np.float64)
    w_gate = np.asarray(layer.w_gate[...], np.float64) if mlp == "swiglu" else None
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731

    def expert(e, v):
        up = v @ w_up[e]
        hidden = gelu(up) if w_gate is None else silu(v @ w_gate[e]) * up
        return hidden @ w_down[e]

    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            logits = x[b, t] @ router
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs)[: layer.top_k]
            weights = probs[chosen] / (probs[chosen].sum() if layer.renormalize else 1.0)
            for rank, (e, w) in enumerate(zip(chosen, weights)):
                if kept is None or kept[b, t, rank]:
                    out[b, t] += w * expert(e, x[b, t])
            if hasattr(layer, "shared"):
                s = layer.shared
                up = x[b, t] @ np.asarray(s.w_up[...], np.float64)
                hidden = silu(x[b, t] @ np.asarray(s.w_gate[...], np.float64)) * up if s.gated else gelu(up)
                out[b, t] += hidden @ np.asarray(s.w_down[...], np.float64)
    return out


@pytest.mark.parametrize("dispatch, kernel", [("dropless", "blocks"), ("dropless", "ragged_dot"), ("capacity", "auto")])
@pytest.mark.parametrize("top_k, shared, mlp, granularity", [(1, 0, "swiglu", 1), (2, 0, "swiglu", 1),
                                                             (2, 1, "swiglu", 1), (2, 0, "gelu", 1),
                                                             (2, 1, "swiglu", 2)])
def test_layer_equals_naive_per_token_loop(dispatch, kernel, top_k, shared, mlp, granularity):
    """G = 2: 8 experts of width 12, 4 per token (the loop reads the layer's own top-k)."""
    cfg = dataclasses.replace(moe_config(top_k=top_k, n_shared_experts=shared, dispatch=dispatch, grouped_matmul=kernel,
                                         capacity_factor=4.0 / top_k, renormalize=top_k > 1,
                                         granularity=granularity), mlp=mlp)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 40, cfg.d_model))  # 240 assignments: several blocks per expert
    y, stats = layer_output(layer, x)
    np.testing.assert_allclose(y, naive_moe(layer, x, mlp), rtol=2e-4, atol=2e-6)
    assert float(stats["dropped"]) == 0.0
    np.testing.assert_allclose(np.sum(stats["load"]), 1.0, rtol=1e-6)


def _numpy_experts(layer: MoE):
    """Expert e's feed-forward and the shared experts' as float64 NumPy functions of a vector."""
    up, down = np.asarray(layer.w_up[...], np.float64), np.asarray(layer.w_down[...], np.float64)
    gate = np.asarray(layer.w_gate[...], np.float64)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    expert = lambda e, v: (silu(v @ gate[e]) * (v @ up[e])) @ down[e]  # noqa: E731
    s = layer.shared
    shared = lambda v: (silu(v @ np.asarray(s.w_gate[...], np.float64)) * (v @ np.asarray(s.w_up[...], np.float64))) \
        @ np.asarray(s.w_down[...], np.float64)  # noqa: E731
    return expert, shared


def naive_experts_choose(layer: MoE, x, valid, capacity):
    """Expert choice as a float64 loop over rows and experts: expert e takes the `capacity`
    non-padding tokens of the row with the highest router probability for e; each token gets
    sum over the experts that took it of p_e * Expert_e(x), plus the shared expert."""
    x = np.asarray(x, np.float64)
    expert, shared = _numpy_experts(layer)
    logits = x @ np.asarray(layer.router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out, picked = np.zeros_like(x), np.zeros(probs.shape, int)
    for b in range(x.shape[0]):
        for e in range(probs.shape[-1]):
            candidates = [t for t in np.argsort(-probs[b, :, e], kind="stable") if valid[b, t]]
            for t in candidates[:capacity]:
                out[b, t] += probs[b, t, e] * expert(e, x[b, t])
                picked[b, t, e] = 1
        for t in range(x.shape[1]):
            out[b, t] += shared(x[b, t])
    return out, picked


@pytest.mark.parametrize("granularity", [1, 2])
def test_experts_choose_equals_per_expert_loop(granularity, capacity_factor=0.5):
    """Padding is never picked (row 1 has 2 real tokens, fewer than the capacity of 3);
    tokens no expert picks get only the shared expert; the unrouted share is the loop's."""
    cfg = encoder_moe_config(top_k=2, n_shared_experts=1, capacity_factor=capacity_factor, granularity=granularity)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    assert layer.n_experts == 4 * granularity and layer.w_up.shape == (4 * granularity, 16, 24 // granularity)
    x = jax.random.normal(jax.random.key(1), (2, 12, cfg.d_model))
    segments = np.ones((2, 12), np.int32)
    segments[1, 2:] = 0
    capacity = expert_capacity(capacity_factor, 2 * granularity, 12, 4 * granularity)
    y, stats = layer_output(layer, x, None, jnp.asarray(segments))
    want, picked = naive_experts_choose(layer, x, segments == 1, capacity)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(stats["picked"]), picked)
    assert capacity == 3 and picked[1, 2:].sum() == 0
    assert picked[0].sum(axis=0).tolist() == [capacity] * (4 * granularity)
    unrouted = (picked.sum(-1) == 0)[segments == 1].mean()
    assert 0 < unrouted < 1 and float(stats["unrouted"]) == pytest.approx(unrouted)
    np.testing.assert_allclose(np.asarray(stats["load"]), picked.sum((0, 1)) / picked.sum(), rtol=1e-6)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    z = np.log(np.exp(logits).sum(-1)) ** 2
    assert float(stats["z_loss"]) == pytest.approx(z[segments == 1].mean(), rel=1e-5)  # padding left out


def test_experts_choose_gradient_and_encoder_decoder_routing():
    """The expert-choice gradient matches central differences (router and experts), and an
    encoder-decoder routes its encoder by expert choice and its causal decoder by token choice."""
    from lmjax.models.lm import EncoderDecoderLM

    with jax.enable_x64(True):
        cfg = encoder_moe_config(top_k=2)
        graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        x = jax.random.normal(jax.random.key(5), (2, 6, cfg.d_model), jnp.float64)
        _check_directional_derivative(graphdef, params, x, jax.random.normal(jax.random.key(6), x.shape, jnp.float64))
    model = EncoderDecoderLM(dataclasses.replace(cfg, family="encoder_decoder"), rngs=nnx.Rngs(0))
    assert model.encoder.blocks.moe.routing_kind == "experts_choose"
    assert model.decoder.blocks.moe.routing_kind == "tokens_choose"

    @nnx.jit
    def routing(model, encoder_tokens, decoder_tokens, encoder_segments):
        model(encoder_tokens, decoder_tokens, encoder_segments)
        return pop_routing_statistics(model)

    stats = routing(model, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 5), jnp.int32),
                    jnp.asarray([[1] * 8, [1] * 3 + [0] * 5]))
    assert stats["unrouted"].shape == (4,) and "picked" not in stats and "experts" not in stats


def test_routing_assignments_under_expert_choice():
    """`lmjax.analysis.routing_assignments` (notebook 02's last figure) on an expert-choice encoder:
    at evaluation settings (the evaluation capacity factor, not the training one's C = 4) every
    expert of every MoE layer picks exactly C = cf_eval * k * T / E tokens of the text, and the
    loads are those picks' shares."""
    from lmjax.analysis import routing_assignments
    from lmjax.models.lm import EncoderLM

    cfg = encoder_moe_config(top_k=1, eval_capacity_factor=0.75)
    routed = routing_assignments(EncoderLM(cfg, rngs=nnx.Rngs(0)), np.arange(3, 15))
    picked = routed["picked"]
    capacity = expert_capacity(0.75, 1, 12, 4)
    assert "experts" not in routed and routed["moe_layers"] == [0, 1] and picked.shape == (2, 12, 4)
    assert capacity == 3 and (picked.sum(axis=1) == capacity).all()
    np.testing.assert_allclose(routed["load"], picked.sum(axis=1) / picked.sum(axis=(1, 2))[:, None], rtol=1e-6)


def test_capacity_equals_dropless_when_nothing_can_drop():
    cfg = moe_config(top_k=2, capacity_factor=2.0)  # capacity = 2 * 2 * T / 4 = T: every token fits
    x = jax.random.normal(jax.random.key(3), (2, 16, cfg.d_model))
    capacity = MoE(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="capacity")), rngs=nnx.Rngs(0))
    dropless = MoE(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless")), rngs=nnx.Rngs(0))
    assert expert_capacity(2.0, 2, 16, 4) == 16
    np.testing.assert_allclose(layer_output(capacity, x)[0], layer_output(dropless, x)[0], rtol=1e-5, atol=1e-6)


def test_overflow_drops_second_choices_before_later_first_choices():
    """Tokens 0-1 prefer expert 0 then 1, tokens 2-3 expert 1 then 0; capacity 2 per expert.
    First choices are served before any second choice, so each expert fills with the first
    choices and every second choice is dropped. (Token-major order would instead give tokens
    0 and 1 both experts and drop the first choices of tokens 2 and 3.)"""
    cfg = ModelConfig(d_model=4, n_layers=1, n_heads=1, d_ff=8,
                      moe=MoEConfig(n_experts=2, top_k=2, dispatch="capacity", capacity_factor=0.5))
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    assert expert_capacity(0.5, 2, 4, 2) == 2
    router = np.zeros((4, 2), np.float32)
    router[0] = [2.0, -2.0]
    layer.router[...] = jnp.asarray(router)
    x = np.zeros((1, 4, 4), np.float32)
    x[0, :, 1:] = np.random.default_rng(0).normal(size=(4, 3))
    x[0, :2, 0], x[0, 2:, 0] = 1.0, -1.0
    kept = np.array([[[True, False]] * 4])
    y, stats = layer_output(layer, jnp.asarray(x))
    np.testing.assert_allclose(y, naive_moe(layer, x, "swiglu", kept), rtol=1e-4, atol=1e-6)
    assert float(stats["dropped"]) == 0.5
    np.testing.assert_array_equal(np.asarray(stats["experts"])[0, :, 0], [0, 0, 1, 1])


def test_overflow_drops_later_positions_first():
    """All 8 tokens want expert 0 (top-1), which has 3 slots: positions 0-2 are served, 3-7
    pass through with zero expert output."""
    cfg = ModelConfig(d_model=4, n_layers=1, n_heads=1, d_ff=8,
                      moe=MoEConfig(n_experts=2, top_k=1, dispatch="capacity", capacity_factor=0.75,
                                    renormalize=False))
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router[...] = jnp.asarray(np.array([[3.0, -3.0], [0, 0], [0, 0], [0, 0]], np.float32))
    x = np.abs(np.random.default_rng(1).normal(size=(1, 8, 4))).astype(np.float32) + 0.5
    y, stats = layer_output(layer, jnp.asarray(x))
    kept = (np.arange(8) < 3)[None, :, None]
    np.testing.assert_allclose(y, naive_moe(layer, x, "swiglu", kept), rtol=1e-4, atol=1e-6)
    assert np.all(y[0, 3:] == 0) and np.all(np.abs(y[0, :3]) > 0)
    assert float(stats["dropped"]) == pytest.approx(5 / 8)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_match_finite_differences(dispatch):
    """Directional derivative of a scalar of the output (plus the aux losses) along a random
    direction in (router, expert) weight space, by jax.grad and by central differences."""
    with jax.enable_x64(True):
        cfg = moe_config(top_k=2, dispatch=dispatch, capacity_factor=2.0)
        graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        x = jax.random.normal(jax.random.key(5), (2, 6, cfg.d_model), jnp.float64)
        probe = jax.random.normal(jax.random.key(6), x.shape, jnp.float64)
        _check_directional_derivative(graphdef, params, x, probe)


def _check_directional_derivative(graphdef, params, x, probe):
    def objective(params):
        model = nnx.merge(graphdef, params)
        y = model(x)
        stats = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))["routing"]
        return jnp.sum(y * probe) + stats["load_balance_loss"] + stats["z_loss"]

    grads = jax.jit(jax.grad(objective))(params)
    objective = jax.jit(objective)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-5
    shifted = lambda s: jax.tree.map(lambda p, v: p + s * eps * v, params, direction)  # noqa: E731
    numeric = (float(objective(shifted(1))) - float(objective(shifted(-1)))) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-5)
    assert float(jnp.linalg.norm(grads["router"][...])) > 0
    assert all(float(jnp.linalg.norm(grads[name][...])) > 0 for name in ("w_up", "w_gate", "w_down"))


def test_interleaved_layers_and_routing_statistics():
    cfg = dataclasses.replace(moe_config(every=2), n_layers=4)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert model.stack.blocks.mlp.w_up.shape[0] == 2 and model.stack.moe_blocks.moe.w_up.shape[0] == 2
    stats = nnx.jit(lambda model, tokens: (model(tokens), pop_routing_statistics(model))[1])(
        model, jnp.arange(32).reshape(2, 16))
    assert stats["load"].shape == (2, 4) and stats["experts"].shape == (2, 2, 16, 2)
    np.testing.assert_allclose(np.sum(stats["load"], axis=1), 1.0, rtol=1e-6)
    assert pop_routing_statistics(DecoderLM(moe_config(n_experts=0), rngs=nnx.Rngs(0))) is None


def test_interleaved_cache_decoding_matches_full_forward():
    """Layer order through the period grouping is right: cached greedy = uncached greedy."""
    from lmjax.generate import generate

    cfg = dataclasses.replace(moe_config(every=2, top_k=1, renormalize=False), n_layers=4, vocab_size=384)
    model = DecoderLM(cfg, rngs=nnx.Rngs(1))
    prompt = np.array([5, 9, 2, 7], np.int32)
    cached = generate(model, [prompt], 6, temperature=0.0)[0]
    np.testing.assert_array_equal(cached, greedy_without_cache(model, prompt, 6))  # dropless: tokens route alone


def test_moe_config_errors():
    from lmjax.config import ConfigError

    moe8 = ["model.moe.n_experts=8", "model.moe.d_ff=96"]
    with pytest.raises(ConfigError, match="model.moe.granularity=5 does not divide the expert width 96"):
        override(Config(), [*moe8, "model.moe.granularity=5"])
    with pytest.raises(ConfigError, match="lets a token's routing depend on later tokens"):
        override(Config(), [*moe8, "model.moe.routing=experts_choose", "model.moe.dispatch=capacity"])
    with pytest.raises(ConfigError, match="set model.moe.dispatch=capacity"):
        override(Config(), [*moe8, "model.family=encoder", "model.moe.routing=experts_choose"])
    with pytest.raises(ConfigError, match="k = 16 experts per token|above k = 8"):
        override(Config(), [*moe8, "model.moe.granularity=8", "model.moe.dispatch=capacity"])
    with pytest.raises(ConfigError, match="model.moe.dispatch: cannot use 'sparse'"):
        override(Config(), ["model.moe.n_experts=4", "model.moe.dispatch=sparse"])
    with pytest.raises(ConfigError, match="capacity_factor and model.moe.eval_capacity_factor must be positive"):
        override(Config(), ["model.moe.n_experts=4", "model.moe.capacity_factor=0"])


def test_bad_granularity_is_one_line_and_exit_2(capsys, tmp_path):
    from lmjax.cli import main

    run = tmp_path / "run"
    assert main(["train", "moe_tiny", "--set", "model.moe.granularity=5", "--set", f"train.run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.moe.granularity=5 does not divide the expert width 352" in err
    assert not run.exists()


def test_layout_errors_before_compiling(monkeypatch):
    from types import SimpleNamespace

    from lmjax.axis_rules import LOGICAL_AXIS_RULES
    from lmjax.config import ConfigError
    from lmjax.parallel import validate_layout

    cfg = override(Config(), ["model.moe.n_experts=8", "model.moe.d_ff=100", "train.batch_size=12"])
    with pytest.raises(ConfigError, match="mesh.expert=3 does not divide model.moe.n_experts=8"):
        validate_layout(cfg, SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, "expert": 3}))
    with pytest.raises(ConfigError, match="mesh.tensor=8 does not divide model.moe.d_ff=100"):
        validate_layout(override(cfg, ["model.d_ff=1024", "model.n_heads=8"]),
                        SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}))
    monkeypatch.setitem(LOGICAL_AXIS_RULES, "expert", ("data",))  # the check follows the rules table
    with pytest.raises(ConfigError, match="mesh.data=3 does not divide model.moe.n_experts=8"):
        validate_layout(cfg, SimpleNamespace(shape={"data": 3, "fsdp": 1, "tensor": 1, "expert": 1}))


def test_router_jitter_only_while_training_with_a_key():
    cfg = moe_config(router_jitter=0.5)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (2, 8, cfg.d_model))
    plain = layer_output(layer, x)[0]
    np.testing.assert_array_equal(layer_output(layer, x, None)[0], plain)  # no key: no noise
    assert not np.allclose(layer_output(layer, x, jax.random.key(0))[0], plain)
    layer.eval()
    np.testing.assert_array_equal(layer_output(layer, x, jax.random.key(0))[0], plain)


REMAPPED_RULES = """
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from lmjax import axis_rules
from lmjax.config import ModelConfig, MoEConfig
from lmjax.models.moe import MoE
from lmjax.parallel import MESH_AXES, state_shardings

# G = 2: 4 experts of width 24 become 8 of width 12, 4 per token; dropless token choice and expert choice
dropless = MoEConfig(n_experts=4, top_k=2, granularity=2, dispatch="dropless", grouped_matmul="blocks")
experts_choose = MoEConfig(n_experts=4, top_k=1, granularity=2, dispatch="capacity", routing="experts_choose")
x = jax.random.normal(jax.random.key(1), (8, 12, 16))
segment_ids = jnp.asarray(np.arange(12)[None, :] < np.arange(4, 12)[:, None], jnp.int32)  # rows of 4..11 tokens
probe = jax.random.normal(jax.random.key(2), x.shape)

def output_and_grads(params, x, segment_ids):
    def objective(params):
        y = nnx.merge(graphdef, params)(x, None, segment_ids)
        return jnp.sum(y * probe), y
    (_, y), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return y, grads

default = dict(axis_rules.LOGICAL_AXIS_RULES)
for name, moe in [("dropless", dropless), ("experts_choose", experts_choose)]:
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=24, param_dtype="float32", dtype="float32",
                      family="encoder", moe=moe)
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    reference = jax.jit(output_and_grads)(params, x, segment_ids)  # one device, no mesh
    for expert_rule, sizes in [(("expert",), (1, 2, 1, 1, 2, 2)), (("data",), (1, 4, 1, 1, 2, 1)),
                               (("tensor",), (1, 2, 2, 1, 2, 1)), (("expert", "fsdp"), (1, 2, 2, 1, 1, 2))]:
        axis_rules.LOGICAL_AXIS_RULES.update(default, expert=expert_rule)
        mesh = Mesh(np.asarray(jax.devices()).reshape(sizes), MESH_AXES)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(params, state_shardings(params, mesh))
            token_axes = axis_rules.logical_to_mesh(("batch", "activation_length", None), mesh)
            tokens = jax.device_put(x, NamedSharding(mesh, token_axes))
            segments = jax.device_put(segment_ids, NamedSharding(mesh, axis_rules.logical_to_mesh(
                ("batch", "activation_length"), mesh)))
            y, grads = jax.jit(output_and_grads)(sharded, tokens, segments)
        np.testing.assert_allclose(y, reference[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        print("equal", name, expert_rule, sizes, sharded["w_up"].sharding.spec)
        axis_rules.LOGICAL_AXIS_RULES.update(default)
"""


def test_expert_parallel_follows_the_rules_table():
    """The dropless layer's shard_map takes its mesh axes from the logical-axis rules: with the
    `expert` logical axis sent to another mesh axis (data, which also splits the tokens; tensor,
    which does not; two axes at once), the sharded layer's output and gradients equal one device's.
    Both with fine-grained experts (G = 2), under token choice (dropless) and expert choice."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", REMAPPED_RULES], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("equal dropless") == 4 and result.stdout.count("equal experts_choose") == 4, \
        result.stdout
    for axes in ("P('expert'", "P('data'", "P('tensor'",
                 "P(('expert', 'fsdp')"):
        assert axes in result.stdout, result.stdout
