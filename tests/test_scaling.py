"""Planner, memory, WSD schedule, fits and sweeps (lmjax.scaling)."""

import csv
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.cli import main
from lmjax.config import Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig
from lmjax.config_parse import override
from lmjax.drivers.sweep import run_sweep, wsd_branches
from lmjax.experiment import load_experiment
from lmjax.scaling.counting import (
    param_counts,
    to_petaflop_days,
    total_steps,
    train_flops_per_example,
    train_flops_per_token,
)
from lmjax.scaling.fit import fit_approach2, fit_approach3, fit_granularity, format_fit, read_results
from lmjax.scaling.memory import activation_bytes_per_token, kv_cache_bytes_per_token, memory_estimate
from lmjax.scaling.plan import chinchilla_optimal
from lmjax.train.optimizer import learning_rate_schedule

REPO = Path(__file__).resolve().parent.parent


def plan_json(capsys, *sets, extra=(), experiment=()) -> dict:
    args = ["plan", *experiment] + [a for s in sets for a in ("--set", s)] + list(extra) + ["--json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


GPT2_SMALL = ["model.vocab_size=50257", "model.d_model=768", "model.n_layers=12", "model.n_heads=12",
              "model.d_ff=3072", "model.mlp=gelu", "model.norm=layernorm", "model.position=learned",
              "model.max_seq_len=1024", "data.seq_len=1024"]


def test_plan_published_shapes(capsys):
    gpt2 = plan_json(capsys, *GPT2_SMALL)
    # 124M with tied embeddings (GPT-2's linear biases, 92,160 weights, are not part of lmjax's blocks)
    assert round(gpt2["params_total"] / 1e6) == 124 and gpt2["params_output_head"] == 0
    assert plan_json(capsys, experiment=["llama2_7b"])["params_total"] == 6_738_415_616
    mixtral = plan_json(capsys, experiment=["mixtral_8x7b"])
    assert round(mixtral["params_total"] / 1e9, 1) == 46.7 and round(mixtral["params_active"] / 1e9, 1) == 12.9
    # FLOPs use the active parameters; KV cache: 2 * 32 layers * 8 kv heads * 128 * 2 bytes
    assert mixtral["flops_per_token_train"] == pytest.approx(
        6 * (mixtral["params_active"] - 32000 * 4096) + 6 * 32 * 4096 * 4096)
    assert mixtral["kv_cache_bytes_per_token"] == 2 * 32 * 8 * 128 * 2


def test_widening_an_experiment_by_d_model_alone_is_noted(capsys):
    """decoder_tiny at d_model 4096 keeps its 4 heads and d_ff 704: plan says so (heads of
    1024, a feed-forward narrower than the width) and points at the named shape; the
    published shapes get no note."""
    assert main(["plan", "--set", "model.d_model=4096", "--set", "model.n_layers=32"]) == 0
    err = capsys.readouterr().err
    assert "heads of width 1024" in err and "model.d_ff=704 is narrower" in err and "llama2_7b" in err
    assert main(["plan", "llama2_7b"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_readme_plan_examples_print_the_published_shapes(capsys):
    """Every `lmjax plan` line of the README runs; the 7B one prints LLaMA-2-7B's published
    6,738,415,616 weights (not decoder_tiny's narrow MLP and 4 heads widened to 4096)."""
    import shlex

    lines = [line.split("#")[0] for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("lmjax plan")]
    counts = [plan_json(capsys, extra=[a for a in shlex.split(line)[2:] if a != "--json"])["params_total"]
              for line in lines]
    assert 6_738_415_616 in counts and len(counts) >= 2


def test_moe_counts_by_hand():
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=48, every=2, n_shared_experts=1)
    cfg = ModelConfig(vocab_size=384, d_model=32, n_layers=4, n_heads=4, d_ff=64, moe=moe)
    attention, norms = 4 * 32 * 32, 2 * 32
    dense_layer = attention + norms + 3 * 32 * 64
    expert = 3 * 32 * 48
    moe_total = attention + norms + 32 * 4 + 4 * expert + expert  # router, 4 routed, 1 shared
    moe_active = attention + norms + 32 * 4 + 2 * expert + expert
    counts = param_counts(cfg)
    assert counts["params_total"] == 384 * 32 + 2 * dense_layer + 2 * moe_total + 32
    assert counts["params_active"] == 384 * 32 + 2 * dense_layer + 2 * moe_active + 32
    dense = param_counts(ModelConfig(vocab_size=384, d_model=32, n_layers=4, n_heads=4, d_ff=64))
    assert dense["params_active"] == dense["params_total"]


def test_plan_budget_and_time(capsys):
    result = plan_json(capsys, extra=["--budget-pfdays", "1", "--hardware", "A100", "--devices", "8", "--mfu", "0.5"])
    assert result["compute_flops"] == pytest.approx(8.64e19) and result["compute_pfdays"] == pytest.approx(1)
    n_opt, d_opt = chinchilla_optimal(8.64e19)
    assert d_opt == pytest.approx(20 * n_opt) and 6 * n_opt * d_opt == pytest.approx(8.64e19)
    assert result["compute_optimal_params"] == pytest.approx(n_opt)
    assert result["wall_seconds"] == pytest.approx(8.64e19 / (0.5 * 8 * 156e12))  # A100 float32 (TF32) peak
    assert result["steps"] == int(8.64e19 // (result["flops_per_token_train"] * result["tokens_per_step"]))
    assert to_petaflop_days(8.64e19) == pytest.approx(1.0)
    # 4 stages, 12 microbatches: the bubble (4 - 1) / (12 + 4 - 1) = 0.2 stretches the wall time by 1 / 0.8
    piped = plan_json(capsys, "mesh.pipeline=4", "mesh.pipeline_microbatches=12", extra=[
        "--budget-pfdays", "1", "--hardware", "A100", "--devices", "8", "--mfu", "0.5"])
    assert piped["pipeline_bubble_fraction"] == pytest.approx(0.2) and piped["pipeline_stages"] == 4
    assert piped["wall_seconds"] == pytest.approx(result["wall_seconds"] / 0.8)


def test_plan_counts_encoder_decoder_targets(capsys):
    """A span-corruption step trains on its inputs and its targets: plan's tokens per step,
    FLOPs per token and compute agree with the budget that sized the run."""
    budget = 1e13
    result = plan_json(capsys, extra=["--budget-flops", str(budget)], experiment=["t5_tiny_span"])
    # 141 raw tokens, 15% noise in spans of mean 3: 21 noise tokens in 7 spans; inputs 120 kept + 7 sentinels
    # + EOS = 128, targets 21 + 7 sentinels + EOS = 29
    inputs, targets = 128, 29
    assert result["tokens_per_step"] == 16 * (inputs + targets)
    per_example = train_flops_per_example(load_experiment("t5_tiny_span").model, inputs, targets)
    assert result["flops_per_token_train"] == pytest.approx(per_example / (inputs + targets))
    assert result["flops_per_token_forward"] == pytest.approx(result["flops_per_token_train"] / 3)
    step_flops = result["flops_per_token_train"] * result["tokens_per_step"]
    assert result["steps"] == int(budget // step_flops) and result["tokens"] == result["steps"] * 16 * 157


def test_memory_by_hand():
    model = ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        dtype="bfloat16", remat="full")
    cfg = Config(model=model, train=TrainConfig(batch_size=8, steps=1), mesh=MeshConfig(data=2, fsdp=2))
    memory = memory_estimate(cfg, n_devices=4)
    params = param_counts(model)["params_total"]
    assert memory["memory_weights_bytes"] == pytest.approx(params * 4 / 2)  # float32 weights, fsdp=2
    assert memory["memory_adam_bytes"] == 2 * memory["memory_weights_bytes"]
    assert kv_cache_bytes_per_token(model) == 2 * 2 * 2 * 16 * 2
    # full remat: the block input per layer + one layer recomputed + float32 logits and their gradient
    one_layer = 5 * 64 * 2 + (64 + 2 * 2 * 16 + 3 * 128) * 2 + 4 * 256 * (4 + 2)
    per_token = 2 * 64 * 2 + one_layer + 2 * 384 * 4
    assert memory["memory_activations_bytes"] == pytest.approx(per_token * 8 * 256 / 4)
    # save_qkv_proj: also q (64) and k, v (2 * 2 * 16) per layer; minimal_with_context: dots + the context (64)
    qkv = dataclasses.replace(model, remat="save_qkv_proj")
    assert activation_bytes_per_token(qkv, 256) == pytest.approx(per_token + 2 * (64 + 2 * 2 * 16) * 2)
    with_context = dataclasses.replace(model, remat="minimal_with_context")
    dots = 4 * 64 * 2 + (2 * 2 * 16 + 2 * 128) * 2
    assert activation_bytes_per_token(with_context, 256) == pytest.approx(2 * (dots + 64 * 2) + 2 * 384 * 4)
    # pipeline 2 x fsdp 2, M = 4: the blocks' weights (and Adam) halve again; each device keeps its
    # layer's activations of all 4 microbatches, and of the bubble's P - 1 idle steps: x 5 / 4
    per_layer = (param_counts(dataclasses.replace(model, n_layers=4))["params_total"] - params) / 2
    piped = dataclasses.replace(cfg, mesh=MeshConfig(pipeline=2, data=1, fsdp=2, pipeline_microbatches=4))
    memory = memory_estimate(piped, n_devices=4)
    assert memory["memory_weights_bytes"] == pytest.approx((params - per_layer) * 4 / 2)
    assert memory["memory_adam_bytes"] == 2 * memory["memory_weights_bytes"]
    layers = (2 * 64 * 2 + one_layer) / 2 * 5 / 4
    assert memory["memory_activations_bytes"] == pytest.approx((layers + 2 * 384 * 4) * 8 * 256 / 2)


def test_wsd_schedule_by_hand():
    cfg = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=2, decay_fraction=0.25, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, 12)
    expected = [0.0, 0.5] + [1.0] * 8 + [1.0 - 0.9 / 3, 1.0 - 1.8 / 3, 0.1]
    assert [float(lr(i)) for i in range(13)] == pytest.approx(expected)
    assert cfg.wsd_decay_start(12) == 9  # the last lr == 1.0: the sweep branches WSD runs off there
    assert cfg.wsd_decay_start(3) == 2  # decay never starts before warmup ends
    with pytest.raises(ConfigError, match="decay_fraction"):
        OptimConfig(schedule="wsd", decay_fraction=0.0)


def test_budget_too_small_for_one_step(tiny):
    cfg = tiny(steps=None, budget_flops=1e3)
    with pytest.raises(ConfigError, match="less than one step"):
        total_steps(cfg)
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len) * 8 * 32
    assert total_steps(override(cfg, [f"train.budget_flops={3.5 * flops}"])) == 3
    # --set train.budget_flops on an experiment sized by steps replaces its length
    assert total_steps(override(tiny(), [f"train.budget_flops={5.5 * flops}"])) == 5


def synthetic_results(rng, noise=0.003):
    """Losses from L = 1.8 + 400/N^0.34 + 410/D^0.28 on IsoFLOP grids, with multiplicative noise."""
    n_list, d_list, c_list = [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        n = np.geomspace(1e7, 1e10, 9) * (c / 1e19) ** 0.5 / 10
        n_list += list(n)
        d_list += list(c / (6 * n))
        c_list += [c] * len(n)
    n, d, c = np.array(n_list), np.array(d_list), np.array(c_list)
    loss = (1.8 + 400 / n**0.34 + 410 / d**0.28) * np.exp(rng.normal(0, noise, len(n)))
    return {"N": n, "D": d, "C": c, "loss": loss}


def test_fit_recovers_known_law():
    data = synthetic_results(np.random.default_rng(0))
    fit3 = fit_approach3(data, bootstrap=4)
    assert fit3["alpha"] == pytest.approx(0.34, abs=0.03) and fit3["beta"] == pytest.approx(0.28, abs=0.03)
    assert fit3["E"] == pytest.approx(1.8, rel=0.05)
    assert fit3["a"] == pytest.approx(0.28 / 0.62, abs=0.03)
    fit2 = fit_approach2(data, bootstrap=4)
    assert fit2["a"] == pytest.approx(0.28 / 0.62, abs=0.05)  # N_opt ~ C^(beta / (alpha + beta))


GRANULARITY_LAW = {"a": 20.0, "alpha": 0.3, "b": 400.0, "beta": 0.3, "g": 60.0, "gamma": 0.6, "c": 1.5}


def test_granularity_law_recovered_from_synthetic_sweep(tmp_path, capsys):
    """`lmjax fit` on a results.csv with a G column: 4 sizes x 3 token counts x G in {1, 2, 4, 8}
    from L = c + (g / G^gamma + a) / N^alpha + b / D^beta with 0.2% multiplicative noise. The
    exponents come back within 0.02 (gamma 0.05), c within 2%, the coefficients within 20%."""
    n, d, g = (np.array(v, float) for v in zip(*itertools.product(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 3),
                                                                   (1, 2, 4, 8))))
    p = GRANULARITY_LAW
    loss = (p["c"] + (p["g"] / g ** p["gamma"] + p["a"]) / n ** p["alpha"] + p["b"] / d ** p["beta"]) * np.exp(
        np.random.default_rng(0).normal(0, 0.002, len(n)))
    path = tmp_path / "results.csv"
    path.write_text("N,D,G,val_loss\n" + "".join(f"{a},{b},{c},{e}\n" for a, b, c, e in zip(n, d, g, loss)))
    assert main(["fit", str(path), "--json", "--bootstrap", "2", "--plots", str(tmp_path / "plots")]) == 0
    fitted = json.loads(capsys.readouterr().out)
    law = fitted["granularity"]
    assert set(law) == {*p, "points", "ci95"} and law["points"] == 48
    for key, tolerance in (("alpha", 0.02), ("beta", 0.02), ("gamma", 0.05)):
        assert law[key] == pytest.approx(p[key], abs=tolerance)
    assert law["c"] == pytest.approx(p["c"], rel=0.02)
    for key in ("a", "b", "g"):
        assert law[key] == pytest.approx(p[key], rel=0.2)
    assert (tmp_path / "plots" / "loss_vs_g.png").is_file()
    assert "granularity (48 results): L(N, D, G) = 1.5" in format_fit(fitted)
    with pytest.raises(ConfigError, match="2 or more granularities"):
        fit_granularity({"N": n, "D": d, "G": np.ones_like(g), "loss": loss})


def test_approach2_takes_the_trained_tokens_when_flops_per_token_are_not_6n():
    """A sweep that spends 6 N (N / 10^6)^0.5 FLOPs per token (p = 1.5 instead of 1): each run
    trains D = C / (6 N^1.5 / 10^3) tokens. For L = E + A/N^alpha + B/D^beta the optimum is then
    N_opt ~ C^(beta / (alpha + p beta)) and D_opt ~ C^(alpha / (alpha + p beta)), where
    C / (6 N_opt) would give D ~ C^(1 - a) instead (0.63 here, not 0.45)."""
    alpha, beta, p, big_a, big_b = 0.34, 0.28, 1.5, 400.0, 410.0
    kappa = 6 / 1e6 ** (p - 1)  # FLOPs per token = kappa N^p
    n_list, c_list = [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        # the true optimum: alpha A N^-alpha = p beta B (kappa N^p / C)^beta
        n_opt = (alpha * big_a * c**beta / (p * beta * big_b * kappa**beta)) ** (1 / (alpha + p * beta))
        n_list += list(n_opt * np.geomspace(1 / 30, 30, 9))
        c_list += [c] * 9
    n, c = np.array(n_list), np.array(c_list)
    d = c / (kappa * n**p)
    loss = (1.8 + big_a / n**alpha + big_b / d**beta) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(n)))
    fit = fit_approach2({"N": n, "D": d, "C": c, "loss": loss}, bootstrap=0)
    assert fit["a"] == pytest.approx(beta / (alpha + p * beta), abs=0.03)
    assert fit["b"] == pytest.approx(alpha / (alpha + p * beta), abs=0.03)
    for minimum in fit["minima"]:  # D_opt is what a run of N_opt trains at that budget
        assert minimum["D_opt"] == pytest.approx(minimum["C"] / (kappa * minimum["N_opt"] ** p), rel=0.1)


def test_fit_summaries_survive_a_runaway_refit():
    """A bootstrap refit that runs off to a degenerate optimum (log A = 800, past a float's
    range) gives an infinite coefficient, an interval unbounded on that side, not an
    OverflowError that loses the whole fit (seen on the 3-seed MoE granularity sweep)."""
    from lmjax.scaling.fit import _approach3_summary, _granularity_summary

    runaway = _approach3_summary((800.0, 1.0, 0.0, 0.3, 0.3))
    assert runaway["A"] == math.inf and runaway["n_opt"]["coefficient"] == math.inf and runaway["B"] == math.e
    assert _granularity_summary((0.0, 0.0, 900.0, 0.0, 0.3, 0.3, 0.5))["b"] == math.inf


def test_fit_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="needs at least 6"):
        fit_approach3({k: v[:4] for k, v in synthetic_results(np.random.default_rng(0)).items()}, bootstrap=0)
    path = tmp_path / "r.csv"
    path.write_text("params,loss\n1,2\n")
    with pytest.raises(ConfigError, match="no column"):
        read_results(path)
    path.write_text("params,tokens,loss\n" + "".join(f"{n},{20 * n},{3 + 1 / n}\n" for n in range(1, 8)))
    data = read_results(path, n_column="params", d_column="tokens", loss_column="loss")
    assert data["C"].tolist() == [6 * n * 20 * n for n in range(1, 8)]
    assert main(["fit", str(tmp_path / "missing.csv")]) == 2


SWEEP_FILES = {
    "tiny.py": """
        from lmjax.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig

        def config():
            return Config(
                model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64),
                optim=OptimConfig(lr=3e-3, warmup_steps=1),
                data=DataConfig(source="stdlib", seq_len=32, max_bytes=100_000, val_fraction=0.05),
                train=TrainConfig(batch_size=8, steps=3, eval_every=100, eval_batches=1, log_every=1,
                                  checkpoint_every=100, sample_tokens=0),
                log=LogConfig(wandb="off", progress_bar=False))
        """,
    "grid.py": """
        from pathlib import Path
        from lmjax.drivers.sweep import grid_sweep

        def sweep():
            return grid_sweep(str(Path(__file__).parent / "tiny.py"), {"model.d_model": [16, 32]})
        """,
}


def test_sweep_resumes_after_kill(tmp_path):
    for name, text in SWEEP_FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "lmjax.cli", "sweep", str(tmp_path / "grid.py"), "--dir", str(sweep_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = sweep_dir / "d_model16" / "result.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (sweep_dir / "d_model32" / "result.json").exists()
    first_metrics = (sweep_dir / "d_model16" / "metrics.jsonl").read_text()

    restarted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert restarted.returncode == 0, restarted.stderr
    assert "d_model16 finished already, skipped" in restarted.stdout
    assert "training d_model16" not in restarted.stdout and "training d_model32" in restarted.stdout
    assert (sweep_dir / "d_model16" / "metrics.jsonl").read_text() == first_metrics
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("name,N,N_total,D,C") and len(rows) == 3


def test_kv_cache_formula_matches_generate_cache():
    from flax import nnx

    from lmjax.models import DecoderLM, EncoderDecoderLM

    model_cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, dtype="bfloat16")
    model = nnx.eval_shape(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(0)))
    keys, values = jax.eval_shape(lambda: model.init_cache(batch_size=3, length=20))["full"]
    cache_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in (keys, values))
    assert keys.dtype == jnp.bfloat16 and cache_bytes == kv_cache_bytes_per_token(model_cfg) * 3 * 20
    # encoder-decoder: 2 decoder layers cache 20 target slots and the cross-attention keys/values of 12 inputs
    enc_dec_cfg = ModelConfig(family="encoder_decoder", d_model=32, n_layers=3, n_decoder_layers=2, n_heads=4,
                              n_kv_heads=2, d_ff=64, dtype="bfloat16", position="relative")
    model = EncoderDecoderLM(enc_dec_cfg, rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 20, jnp.zeros((3, 12, 32), jnp.bfloat16))["full"]
    assert [c.shape for c in cache] == [(2, 3, 20, 2, 8)] * 2 + [(2, 3, 12, 2, 8)] * 2
    assert sum(np.prod(x.shape) * x.dtype.itemsize for x in cache) == kv_cache_bytes_per_token(enc_dec_cfg) * 3 * 32
    assert kv_cache_bytes_per_token(dataclasses.replace(enc_dec_cfg, family="encoder", n_decoder_layers=None)) == 0


def test_wsd_branch_equals_run_from_scratch(tiny, tmp_path):
    """A cooldown branched from the trunk's stable phase ends where a WSD run of that
    length trained from scratch ends."""
    base = override(tiny(steps=None, tokens=256 * 4, checkpoint_every=100, sample_tokens=0, eval_batches=1),
                    ["optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.warmup_steps=1"])
    experiment = tmp_path / "base.py"
    experiment.write_text("from lmjax.config_parse import config_from_dict\n\ndef config():\n"
                          f"    return config_from_dict({base.to_dict()!r})\n")
    sweep = wsd_branches(str(experiment), [{"model.d_model": 32}], tokens=[256 * 4])
    log = []
    run_sweep(sweep, tmp_path / "sweep", log=log.append)
    assert any("growing trunk d_model32-trunk to step 2" in line for line in log)
    branched = json.loads((tmp_path / "sweep" / "d_model32-D1024" / "result.json").read_text())

    from lmjax.train.loop import train

    scratch = train(override(base, [f"train.run_dir={tmp_path / 'scratch'}"]), tmp_path / "scratch")
    assert branched["val_loss"] == pytest.approx(scratch["val_loss"], abs=1e-5)


def test_sweep_emits_cluster_commands(tmp_path, capsys):
    for name, text in SWEEP_FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    assert main(["sweep", str(tmp_path / "grid.py"), "--dir", "out", "--slurm"]) == 0
    script = capsys.readouterr().out
    assert "--array=0,1" in script and "--only-index $SLURM_ARRAY_TASK_ID" in script and "--collect" in script
    assert main(["sweep", str(tmp_path / "grid.py"), "--dir", "out", "--commands"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("--dir out --only-index 1")
    assert main(["sweep", str(tmp_path / "grid.py"), "--only-index", "2"]) == 2


def test_moe_granularity_sweep_builds_and_a_tiny_point_trains(tmp_path):
    """experiments/moe_granularity.py: 36 valid runs at G in {1, 2, 4, 8} with equal expert
    parameters (total counts differ by the routers alone); one point, cut to 2 steps, trains
    through `run_sweep` and its results.csv carries G for `lmjax fit`."""
    from lmjax.drivers.sweep import Sweep, SweepRun, load_sweep, run_config
    from lmjax.scaling.counting import router_params

    sweep = load_sweep("moe_granularity")
    configs = [run_config(sweep, run, tmp_path) for run in sweep.runs]
    assert len(configs) == 36 and {c.model.moe.granularity for c in configs} == {1, 2, 4, 8}
    for cfg in configs:
        coarse = override(cfg, ["model.moe.granularity=1"]).model
        routers = cfg.model.n_layers * (router_params(cfg.model) - router_params(coarse))
        assert param_counts(cfg.model)["params_total"] - param_counts(coarse)["params_total"] == routers
    run = next(r for r in sweep.runs if r.name.endswith("G4"))
    tiny = Sweep(sweep.experiment, (SweepRun(run.name, (*run.overrides, "train.tokens=2048", "train.eval_batches=1")),))
    results = run_sweep(tiny, tmp_path / "sweep", log=lambda line: None)
    rows = list(csv.DictReader(results.open()))
    assert len(rows) == 1 and rows[0]["G"] == "4" and math.isfinite(float(rows[0]["val_loss"]))
