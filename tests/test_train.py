import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.checkpoint import Checkpointer
from lmjax.config import MeshConfig, MoEConfig, OptimConfig
from lmjax.parallel import make_mesh
from lmjax.records import read_metrics
from lmjax.runs import restore_weights
from lmjax.train.loop import train
from lmjax.train.metrics import peak_flops_per_device
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import abstract_train_state, init_train_state
from lmjax.train.step import make_train_step


def final_params(cfg, run_dir):
    mesh = make_mesh(MeshConfig())
    _, abstract, _ = abstract_train_state(cfg.model, lambda p: make_optimizer(cfg.optim, cfg.train.steps, p), mesh)
    checkpointer = Checkpointer(run_dir, async_save=False)
    state, data_state, _ = checkpointer.restore(abstract)
    checkpointer.close()
    return state, data_state


def test_loss_falls_and_run_writes_its_files(tiny):
    cfg = tiny(steps=40, eval_every=20, eval_batches=4)
    summary = train(cfg, cfg.train.run_dir)
    records = read_metrics(cfg.train.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert summary["finished"] and len(val) == 2
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])  # from ~ln(384) = 5.95 towards byte statistics
    assert val[-1] < 0.7 * losses[0]
    assert all(k in records[-2] for k in ("tokens_per_second", "mfu", "grad_norm", "lr", "step_seconds"))
    # MFU by hand for this model (d 32, 2 layers, 4 heads of 8, 2 kv heads, SwiGLU d_ff 64, 384-id tied head,
    # 32-token windows): 6 N per token with N = per layer q, k, v, o (32*32 + 2 * 32*16 + 32*32) + MLP 3*32*64
    # + two norms (2*32), the final norm (32) and the head (32*384); plus attention 6 * L * T * heads * head_dim
    n = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32 + 32 * 384
    flops_per_token = 6 * n + 6 * 2 * 32 * 4 * 8
    assert flops_per_token == 197_568
    peak = peak_flops_per_device("float32") * jax.device_count()  # the CPU probe, cached: the value train() used
    for record in (r for r in records if "mfu" in r):
        expected = record["tokens_per_second"] * flops_per_token / peak
        assert record["mfu"] == pytest.approx(expected, rel=1e-12)
        assert record["tokens_per_second"] == pytest.approx(8 * 32 / record["step_seconds"], rel=1e-12)
    for name in ("config.json", "metrics.jsonl", "loss.png", "sample.txt", "environment.json"):
        assert (Path(cfg.train.run_dir) / name).exists()


def test_resume_is_bitwise_exact(tmp_path, tiny):
    straight = dataclasses.replace(tiny(), train=dataclasses.replace(tiny().train, run_dir=str(tmp_path / "a")))
    train(straight, tmp_path / "a")
    interrupted = dataclasses.replace(straight, train=dataclasses.replace(straight.train, run_dir=str(tmp_path / "b"),
                                                                          halt_at_step=3))
    assert train(interrupted, tmp_path / "b") == {"step": 3, "finished": False}
    resumed = dataclasses.replace(interrupted, train=dataclasses.replace(interrupted.train, halt_at_step=None))
    assert train(resumed, tmp_path / "b")["finished"]
    (a, data_a), (b, data_b) = final_params(straight, tmp_path / "a"), final_params(resumed, tmp_path / "b")
    assert int(a.step) == int(b.step) == 6 and data_a == data_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    goodput = json.loads((tmp_path / "b" / "goodput.json").read_text())  # summed over both invocations
    assert goodput["invocations"] == 2 and goodput["steps"] == {"productive_steps": 6, "redone_steps": 0}
    assert sum(goodput["seconds"].values()) == pytest.approx(goodput["wall_seconds"], rel=1e-12)
    loss_a = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    loss_b = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert loss_a == loss_b


def test_weights_restore_leaves_the_adam_moments_on_disk(tiny):
    """Notebooks and `lmjax eval` restore the weights alone (Orbax's partial restore of the
    saved TrainState's params): the same arrays as a full restore, the optimizer state (2/3
    of the checkpoint) never read."""
    cfg = tiny(steps=4, checkpoint_every=4, eval_every=4, eval_batches=1, sample_tokens=0)
    train(cfg, cfg.train.run_dir)
    full, _ = final_params(cfg, cfg.train.run_dir)
    _, _, params, step, _ = restore_weights(Path(cfg.train.run_dir))
    assert step == 4
    for restored, expected in zip(jax.tree.leaves(params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_array_equal(restored, expected)
    checkpointer = Checkpointer(cfg.train.run_dir, async_save=False)
    assert checkpointer.holds_optimizer_state()  # a training checkpoint, unlike an imported one
    checkpointer.close()


def test_gradient_accumulation_equals_full_batch(tiny):
    cfg = tiny()
    mesh = make_mesh(MeshConfig())
    batch = {
        "inputs": jax.random.randint(jax.random.key(0), (8, 16), 0, 256),
        "positions": jnp.broadcast_to(jnp.arange(16), (8, 16)),
        "segment_ids": jnp.ones((8, 16), jnp.int32),
        "loss_mask": (jax.random.uniform(jax.random.key(2), (8, 16)) > 0.3).astype(jnp.float32),
    }
    batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
    results = []
    for accum in (1, 4):
        optim = dataclasses.replace(cfg.optim, grad_accum_steps=accum)
        graphdef, state, _, optimizer = init_train_state(cfg.model, lambda p: make_optimizer(optim, 10, p), 0, mesh)
        step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 10), accum, False))
        results.append(step(state, batch))
    (s1, m1, _), (s4, m4, _) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_schedule_shape():
    sched = learning_rate_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), 110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0) and float(sched(110)) == pytest.approx(0.1)
    assert float(sched(60)) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    linear = learning_rate_schedule(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"), 100)
    assert float(linear(50)) == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_weight_decay_by_parameter_role(tiny, family):
    """One AdamW step with zero gradients moves exactly the decayed parameters, by lr * wd * p:
    the stack's matrices, the output head and the router; never embeddings, learned positions,
    relative-bias tables (deliberately: an embedding of distance buckets), norm gains or biases."""
    from lmjax.families import family_of

    model_cfg = dataclasses.replace(tiny().model, family=family, tie_embeddings=False, norm="layernorm",
                                    position="learned" if family == "decoder" else "relative",
                                    moe=MoEConfig(n_experts=2, n_shared_experts=1))
    params = nnx.state(family_of(model_cfg).build(model_cfg, nnx.Rngs(0)), nnx.Param)
    optim = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=None)
    optimizer = make_optimizer(optim, 10, params)
    ones = jax.tree.map(jnp.ones_like, params)  # (zero-initialised biases would not show their decay)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), ones)
    dotted = lambda path: ".".join(str(getattr(p, "key", p)) for p in path)  # noqa: E731
    moved = {dotted(path): bool(jnp.any(u != 0))
             for path, u in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(updates))}
    roles = {dotted(path): v.get_metadata()["role"]
             for path, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    not_decayed = {name for name in moved if name.split(".")[-1] in ("table", "pos_embed", "scale", "bias")}
    assert {name for name, m in moved.items() if not m} == not_decayed
    assert any("relative_bias" in n or "encoder_bias" in n for n in not_decayed) == (family == "encoder_decoder")
    assert {roles[n] for n in not_decayed} <= {"input", "vector"}
    assert {n.split(".")[-1] for n, m in moved.items() if m} == {"wq", "wk", "wv", "wo", "w_up", "w_gate", "w_down",
                                                                 "router", "unembed"}
    np.testing.assert_allclose(nnx.to_pure_dict(updates)["unembed"], -0.5 * 0.1, rtol=1e-6)


def test_wandb_offline_needs_no_account(tiny, tmp_path, monkeypatch):
    from lmjax.train.loggers import MetricsLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = dataclasses.replace(tiny(), log=dataclasses.replace(tiny().log, wandb="offline"))
    logger = MetricsLogger(cfg, tmp_path, resume=False)
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}]
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_records_and_eval_json_write_null_for_nan(tiny, tmp_path, monkeypatch, capsys):
    """metrics.jsonl, routing.jsonl and `lmjax eval --json` are strict JSON (NaN and inf are not
    JSON): non-finite values are null, and the readers give NaN back."""
    import json
    import math

    import lmjax.runs
    from lmjax.cli import main
    from lmjax.records import read_routing
    from lmjax.train.loggers import MetricsLogger

    def strict(line):
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written"))

    cfg = dataclasses.replace(tiny(), log=dataclasses.replace(tiny().log, wandb="off"))
    logger = MetricsLogger(cfg, tmp_path, resume=False)
    logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    logger.log_routing(1, {"load": np.array([[0.5, np.nan]]), "dropped": np.array([0.0])})
    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None}
    assert strict((tmp_path / "routing.jsonl").read_text())["load"] == [[0.5, None]]
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"])
    np.testing.assert_array_equal(read_routing(tmp_path)["load"], [[[0.5, np.nan]]])
    monkeypatch.setattr(lmjax.runs, "evaluate_run", lambda *args: {"step": 3, "loss": float("nan")})
    assert main(["eval", str(tmp_path), "--json"]) == 0
    assert strict(capsys.readouterr().out) == {"step": 3, "loss": None}


def test_stop_right_after_a_periodic_checkpoint_saves_once(tiny, monkeypatch):
    """Ctrl-C handled just after the step-2 periodic save: the stop's save finds the step
    already saved (Orbax would refuse a second save of one step) and the run ends cleanly."""
    import lmjax.train.loop as loop

    class StopAfterTwoSteps:
        checks = 0

        def __init__(self, warning_signal):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, run):
            self.checks += 1
            return self.checks > 2

    monkeypatch.setattr(loop, "StopRequest", StopAfterTwoSteps)
    cfg = tiny(checkpoint_every=2, steps=6)
    result = train(cfg, Path(cfg.train.run_dir))
    assert result["step"] == 2 and not result["finished"]
    assert Checkpointer(Path(cfg.train.run_dir)).latest_step() == 2


def test_step_loop_calls_hooks_when_due_and_asks_every_stop_signal():
    """A plain counter for a run: hooks fire every `every` steps (the last step only with
    at_halt), and every stop signal is asked before every step even once one says stop."""
    from types import SimpleNamespace

    from lmjax.train.loop import Hook, step_loop

    run = SimpleNamespace(step=0, halt=5, state=0, next_batch=lambda: None,
                          train_step=lambda state, batch: (state + 1, {"loss": state}, {}))
    calls, asked = [], []
    hooks = [Hook(lambda run, metrics, routing: calls.append(("every 2", run.step, metrics["loss"])), every=2),
             Hook(lambda run, metrics, routing: calls.append(("at halt", run.step, metrics["loss"])), every=5,
                  at_halt=True)]
    step_loop(run, hooks, [lambda run: run.step == 9, lambda run: asked.append(run.step) or False])
    assert run.step == run.state == 5 and asked == [0, 1, 2, 3, 4]
    assert calls == [("every 2", 2, 1), ("every 2", 4, 3), ("at halt", 5, 4)]

    run.step, run.halt, asked[:] = 0, 5, []
    step_loop(run, [], [lambda run: run.step == 3, lambda run: asked.append(run.step) or False])
    assert run.step == 3 and asked == [0, 1, 2, 3]
