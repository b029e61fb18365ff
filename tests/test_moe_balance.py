"""Router scores and auxiliary-loss-free balancing: selection with a bias, the sign update, MaxVio,
padding left out of the load, the sequence balancing loss, and the bias in training and resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.checkpoint import write_weights_run
from lmjax.cli import DEFAULT_EXPERIMENT, main
from lmjax.config import ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig
from lmjax.config_parse import override
from lmjax.experiment import load_experiment
from lmjax.models.lm import DecoderLM, EncoderDecoderLM
from lmjax.models.moe import (
    RouterBias,
    bias_update,
    max_violation,
    pop_routing_by_stack,
    route,
    router_statistics,
    sequence_balance_loss,
    update_router_bias,
)
from lmjax.parallel import make_mesh
from lmjax.records import read_metrics, read_routing
from lmjax.runs import restore_params
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.resume import add_missing_router_biases, check_init_from
from lmjax.train.state import abstract_train_state, init_train_state
from lmjax.train.step import make_train_step


def model_config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16,
                       moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))


def numpy_route(logits, bias, top_k, score, renormalize):
    """Per token, in float64: scores, the k largest of scores + bias (ties to the lower index), and
    their unbiased scores as weights."""
    logits = np.asarray(logits, np.float64)
    experts, weights = [], []
    for row in logits:
        if score == "softmax":
            scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        else:
            scores = 1 / (1 + np.exp(-row))
        chosen = sorted(range(len(row)), key=lambda e: (-(scores[e] + bias[e]), e))[:top_k]
        w = scores[chosen]
        experts.append(chosen)
        weights.append(w / w.sum() if renormalize else w)
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("score, renormalize", [("sigmoid", True), ("sigmoid", False), ("softmax", True)])
def test_selection_with_bias_matches_numpy(score, renormalize):
    logits = jax.random.normal(jax.random.key(0), (64, 8))
    bias = np.asarray(jax.random.normal(jax.random.key(1), (8,))) * 0.3  # large enough to change choices
    _, weights, experts = route(logits, 3, renormalize, score, jnp.asarray(bias, jnp.float32))
    ref_experts, ref_weights = numpy_route(logits, bias, 3, score, renormalize)
    np.testing.assert_array_equal(np.asarray(experts), ref_experts)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=1e-5)
    unbiased = numpy_route(logits, np.zeros(8), 3, score, renormalize)[0]
    assert (unbiased != ref_experts).any()  # the bias changed some choices


def test_sign_update_matches_numpy_loop():
    counts = np.asarray(jax.random.randint(jax.random.key(2), (5, 3, 6), 0, 20), np.float32)  # steps, layers, E
    bias, ref = jnp.zeros((3, 6), jnp.float32), np.zeros((3, 6))
    for step_counts in counts:
        bias = bias_update(bias, jnp.asarray(step_counts), 1e-3)
        for layer in range(3):
            mean = step_counts[layer].mean()
            for e in range(6):
                ref[layer, e] += 1e-3 * (1.0 if step_counts[layer, e] < mean else -1.0 if step_counts[layer, e] > mean
                                         else 0.0)
    np.testing.assert_allclose(np.asarray(bias), ref, atol=1e-7)


def test_max_violation_and_load_by_hand_without_padding():
    # 5 tokens, E = 4, k = 2; token 4 is padding. Assignments of the other 4 tokens:
    # expert 0: tokens 0, 1, 2 -> 3; expert 1: tokens 0, 3 -> 2; expert 2: token 1 -> 1; expert 3: tokens 2, 3 -> 2
    experts = jnp.array([[0, 1], [2, 0], [0, 3], [3, 1], [0, 0]])
    logits = jnp.zeros((5, 4))
    mask = jnp.array([True, True, True, True, False])
    stats = router_statistics(logits, jax.nn.softmax(logits), experts, 4, mask)
    np.testing.assert_array_equal(np.asarray(stats["counts"]), [3, 2, 1, 2])
    np.testing.assert_allclose(np.asarray(stats["load"]), [3 / 8, 2 / 8, 1 / 8, 2 / 8])
    np.testing.assert_allclose(float(max_violation(stats["load"])), 4 * 3 / 8 - 1)  # 0.5
    assert float(router_statistics(logits, jax.nn.softmax(logits), experts, 4)["counts"][0]) == 5  # padding counted


def test_sequence_balance_loss_matches_numpy_loop():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(3), (3, 5, 4)))
    experts = jax.random.randint(jax.random.key(4), (3, 5, 2), 0, 4)
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    mask[2, :] = False  # an all-padding row does not count
    ref = []
    for b in range(2):
        rows = np.flatnonzero(mask[b])
        f = np.array([np.sum(np.asarray(experts)[b, rows] == e) for e in range(4)]) / (2 * len(rows))
        p = np.asarray(probs, np.float64)[b, rows].mean(axis=0)
        ref.append(4 * np.sum(f * p))
    np.testing.assert_allclose(float(sequence_balance_loss(probs, experts, 4, jnp.asarray(mask))), np.mean(ref),
                               rtol=1e-6)


def test_model_leaves_padding_out_of_the_load():
    cfg = model_config(router="sigmoid")
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 64)
    segments = jnp.array([[1] * 12, [1] * 7 + [0] * 5])
    model(tokens, None, segments)
    stats = pop_routing_by_stack(model)["stack"]
    chosen = np.asarray(stats["experts"])  # (L, B, T, k)
    for layer in range(2):
        hand = [np.sum(chosen[layer][np.asarray(segments) != 0] == e) for e in range(4)]
        np.testing.assert_array_equal(np.asarray(stats["counts"][layer]), hand)


def test_each_stack_of_an_encoder_decoder_moves_by_its_own_counts():
    cfg = dataclasses.replace(model_config(bias_update_rate=0.5), family="encoder_decoder", n_decoder_layers=4,
                              moe=MoEConfig(n_experts=4, bias_update_rate=0.5, every=2))
    state = nnx.state(nnx.eval_shape(lambda: EncoderDecoderLM(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(jnp.zeros_like, state)
    counts = {"encoder": jnp.array([[4.0, 0, 0, 0]]), "decoder": jnp.array([[0.0, 4, 0, 0], [1, 1, 1, 1]])}
    moved = nnx.to_pure_dict(update_router_bias(state, counts, 0.5))
    np.testing.assert_array_equal(moved["encoder"]["moe_blocks"]["moe"]["router_bias"], [[-0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(moved["decoder"]["moe_blocks"]["moe"]["router_bias"],
                                  [[0.5, -0.5, 0.5, 0.5], [0, 0, 0, 0]])


def test_bias_is_kept_out_of_the_optimizer_and_absent_by_default():
    optim = OptimConfig(master_weights=True)
    model = dataclasses.replace(model_config(router="sigmoid"), param_dtype="bfloat16", parametrization="mup",
                                mup_base_width=8)
    _, abstract, _ = abstract_train_state(model, lambda p: make_optimizer(optim, 10, p, model), make_mesh(MeshConfig()))
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract)]
    assert [n for n in names if "router_bias" in n] == [".params['stack']['blocks']['moe']['router_bias'].value"]
    assert abstract.params["stack"]["blocks"]["moe"]["router_bias"].dtype == jnp.float32
    default = nnx.state(nnx.eval_shape(lambda: DecoderLM(model_config(), rngs=nnx.Rngs(0))), RouterBias)
    assert not jax.tree.leaves(default)  # old checkpoints and imports have no bias to restore


def test_step_load_and_update_cover_every_micro_batch():
    cfg = model_config(router="sigmoid", bias_update_rate=0.01)
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    tokens = jax.random.randint(jax.random.key(6), (4, 17), 0, 64)
    segments = jnp.ones((4, 16), jnp.int32).at[2:, 9:].set(0)  # the second micro-batch holds the padding
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
             "segment_ids": segments, "loss_mask": segments.astype(jnp.float32)}
    results = {}
    for accum in (1, 2):
        graphdef, state, _, optimizer = init_train_state(cfg, lambda p: make_optimizer(optim, 10, p), 0,
                                                         make_mesh(MeshConfig()))
        step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 10), accum, False, cfg.moe))
        new, metrics, routing = step(state, batch)
        results[accum] = new.params["stack"]["blocks"]["moe"]["router_bias"][...], routing, metrics
    np.testing.assert_array_equal(np.asarray(results[1][0]), np.asarray(results[2][0]))
    np.testing.assert_allclose(np.asarray(results[2][1]["load"]), np.asarray(results[1][1]["load"]), rtol=1e-6)
    np.testing.assert_allclose(float(results[2][2]["moe_max_violation"]),
                               float(np.mean(max_violation(results[1][1]["load"]))), rtol=1e-6)
    assert np.abs(np.asarray(results[1][0])).max() == pytest.approx(0.01)  # moved by exactly u
    # the first micro-batch alone would have moved the bias differently
    model = nnx.merge(graphdef, state.params)
    model(batch["inputs"][:2], batch["positions"][:2], segments[:2])
    first = pop_routing_by_stack(model)["stack"]["counts"]
    assert not np.array_equal(np.asarray(bias_update(jnp.zeros((2, 4)), first, 0.01)), np.asarray(results[2][0]))


TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4", "--set", "model.d_ff=64",
        "--set", "model.max_seq_len=32", "--set", "data.seq_len=32", "--set", "data.max_bytes=200000",
        "--set", "train.batch_size=8", "--set", "train.steps=4", "--set", "train.log_every=1",
        "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0", "--set", "log.wandb=off",
        "--set", "log.progress_bar=false", "--set", "model.moe.n_experts=4", "--set", "model.moe.router=sigmoid",
        "--set", "model.moe.bias_update_rate=0.01", "--set", "model.moe.sequence_balance_coef=0.001"]


def write_bias_less_run(run_dir):
    """A weights-only run of TINY's model with a softmax router and no bias update: no bias."""
    cfg = override(load_experiment(DEFAULT_EXPERIMENT), [*TINY[1::2], "model.moe.router=softmax",
                                                          "model.moe.bias_update_rate=0"])
    write_weights_run(run_dir, cfg.to_dict(), nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(3))))
    return cfg


def test_bias_moves_in_training_and_resumes_bit_for_bit(tmp_path, capsys):
    """Both runs start from a bias-less run's weights (`--init-from`): their bias starts at zeros."""
    whole, halted, source = tmp_path / "whole", tmp_path / "halted", tmp_path / "source"
    source_cfg = write_bias_less_run(source)
    init = ["--init-from", str(source)]
    assert main(["train", *TINY, *init, "--set", f"train.run_dir={whole}"]) == 0
    assert main(["train", *TINY, *init, "--set", f"train.run_dir={halted}", "--set", "train.halt_at_step=2"]) == 0
    assert main(["train", "--resume", str(halted), "--set", "train.halt_at_step=none"]) == 0
    routing = read_routing(whole)
    bias = np.asarray(routing["bias"])  # (steps, L, E): the bias each step routed with
    assert not bias[0].any() and np.abs(bias[-1]).max() > 0  # it started at zeros and moved
    np.testing.assert_allclose(np.abs(np.diff(bias, axis=0)), 0.01 * np.abs(np.sign(np.diff(bias, axis=0))),
                               atol=1e-6)  # by exactly u per step
    np.testing.assert_array_equal(bias, np.asarray(read_routing(halted)["bias"]))
    assert [r["loss"] for r in read_metrics(whole) if "loss" in r] == [r["loss"] for r in read_metrics(halted)
                                                                        if "loss" in r]
    saved = [nnx.to_pure_dict(restore_params(run))["stack"]["blocks"]["moe"]["router_bias"] for run in (whole, halted)]
    np.testing.assert_array_equal(np.asarray(saved[0]), np.asarray(saved[1]))
    np.testing.assert_allclose(np.asarray(saved[0]), bias[-1] + 0.01 * np.sign(np.asarray(saved[0]) - bias[-1]),
                               atol=1e-6)  # the checkpoint holds the bias after the last step's update
    assert "moe_max_violation_1" in read_metrics(whole)[0] and "moe_sequence_balance_loss" in read_metrics(whole)[0]
    # --init-from: the source's weights as they are, completed by zero biases; the reverse is refused
    restored = restore_params(source)
    biased = override(source_cfg, TINY[1::2])
    merged = nnx.to_pure_dict(add_missing_router_biases(restored, nnx.state(DecoderLM(biased.model, rngs=nnx.Rngs(0)))))
    assert not np.asarray(merged["stack"]["blocks"]["moe"].pop("router_bias")).any()
    jax.tree.map(np.testing.assert_array_equal, merged, nnx.to_pure_dict(restored))
    with pytest.raises(ConfigError, match="router_bias.* only in"):
        check_init_from(source_cfg, whole)
    # a sigmoid router has no transformers form: refused before anything is written
    assert main(["convert", "to-hf", str(whole), "--out", str(tmp_path / "hf")]) == 2
    assert "no selection bias" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_bad_input_is_one_line_before_compiling(capsys, tmp_path):
    run = ["--set", f"train.run_dir={tmp_path}/r"]
    assert main(["train", *TINY, "--set", "model.moe.bias_update_rate=-0.1", *run]) == 2
    assert "model.moe.bias_update_rate must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="router"):
        MoEConfig(n_experts=4, router="cosine")
