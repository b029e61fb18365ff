"""µP (model.parametrization="mup"): equal to the standard parametrization at the base width,
multipliers by hand, the coordinate check, sharding, resume, and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_parallel import TINY, finish, lmjax_subprocess, losses, mesh_args

import lmjax
from lmjax.cli import main
from lmjax.config import Config, ConfigError, ModelConfig, MoEConfig, OptimConfig
from lmjax.drivers.coordinate_check import (
    OFF_DEFAULT_CONSTANTS,
    OFF_DEFAULT_EPS,
    WIDTHS,
    coordinate_check,
    coordinate_data,
    text_batch,
    width_exponents,
    width_slopes,
)
from lmjax.families import family_of
from lmjax.records import read_metrics
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import TrainState
from lmjax.train.step import make_train_step


def dotted(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def model_config(width=64, parametrization="standard", base=64, **changes) -> ModelConfig:
    """A decoder touching every role: untied head, learned positions, layernorm biases, MoE
    with a shared expert every second layer (so the stack has dense and MoE blocks)."""
    cfg = ModelConfig(vocab_size=272, d_model=width, n_layers=2, n_heads=width // 16, d_head=16, d_ff=2 * width,
                      max_seq_len=16, tie_embeddings=False, position="learned", norm="layernorm", mlp="gelu",
                      moe=MoEConfig(n_experts=4, top_k=2, every=2, n_shared_experts=1),
                      parametrization=parametrization, mup_base_width=base)
    return dataclasses.replace(cfg, **changes)


def leaves(state) -> dict:
    return {dotted(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def train_three_steps(cfg: ModelConfig):
    """Params after init and after each of 3 AdamW steps (clipping and weight decay on; an
    epsilon of the size of the smaller gradients, so that it matters)."""
    optim = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0, eps=1e-5)
    graphdef, params = nnx.split(family_of(cfg).build(cfg, nnx.Rngs(0)), nnx.Param)
    optimizer = make_optimizer(optim, 3, params, cfg)
    step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 3), 1, use_rng=False,
                                   moe=cfg.moe))
    batch = text_batch(2, 16)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.uint32))
    history = [leaves(state.params)]
    for _ in range(3):
        state = step(state, batch)[0]
        history.append(leaves(state.params))
    return history


CONSTANTS = OFF_DEFAULT_CONSTANTS  # base constants away from the defaults (init stds 0.05, 0.03, 0.01)


def test_base_width_equals_standard_within_one_ulp():
    """With the same base constants set away from 1: the forward pass and 3 optimizer steps
    (µP's Adam epsilon scaled with width too)."""
    standard = train_three_steps(model_config(**CONSTANTS))
    mup = train_three_steps(model_config(parametrization="mup", mup_scale_adam_eps=True, **CONSTANTS))
    for before, after in zip(standard, mup):
        assert before.keys() == after.keys()
        for name in before:
            np.testing.assert_array_max_ulp(before[name], after[name], maxulp=1)


def test_init_scales_hidden_matrices_only():
    """At 4x the base width: the same random draws, hidden matrices times sqrt(1/4) (the
    residual-writing ones keep their extra 1/sqrt(2L)); embeddings, head, router, norms unchanged."""
    standard_cfg, mup_cfg = model_config(128), model_config(128, "mup", base=32)
    standard = leaves(nnx.state(family_of(standard_cfg).build(standard_cfg, nnx.Rngs(0)), nnx.Param))
    mup = leaves(nnx.state(family_of(mup_cfg).build(mup_cfg, nnx.Rngs(0)), nnx.Param))
    hidden = ("wq", "wk", "wv", "wo", "w_up", "w_down", "w_gate")
    for name, value in standard.items():
        expected = value * 0.5 if name.split(".")[-1] in hidden else value
        np.testing.assert_allclose(mup[name], expected, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_output_and_router_logits_are_multiplied_by_base_over_width(family):
    """A µP model at twice the base width computes the standard model's function with the
    logits and router logits halved: checked by halving the standard model's head and router."""
    cfg = model_config(64, family=family, position="relative" if family == "encoder_decoder" else "learned")
    if family != "decoder":  # the router is the decoder's to check; dense keeps these two cheap
        cfg = dataclasses.replace(cfg, moe=MoEConfig())
    mup_cfg = dataclasses.replace(cfg, parametrization="mup", mup_base_width=32)
    standard, mup = family_of(cfg).build(cfg, nnx.Rngs(0)), family_of(mup_cfg).build(mup_cfg, nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(standard, nnx.Param))
    nnx.update(mup, params)
    nnx.update(standard, jax.tree_util.tree_map_with_path(
        lambda path, v: v * 0.5 if dotted(path).endswith(("unembed", "router")) else v, params))
    tokens = text_batch(2, 16)["inputs"]
    inputs = (tokens, tokens[:, ::-1]) if family == "encoder_decoder" else (tokens,)
    np.testing.assert_allclose(mup(*inputs), standard(*inputs), rtol=1e-5, atol=1e-6)


def test_init_std_per_role():
    """At 4x the base width with per-role init stds: embeddings and positions at the input
    std, head and router at the output std, hidden matrices at the hidden std / sqrt(4)
    (wo, w_down also / sqrt(2 L)); the sample std of each within 10%."""
    cfg = model_config(128, "mup", base=32, **CONSTANTS)
    params = leaves(nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)), nnx.Param))
    expected = {"embed.table": 0.05, "pos_embed": 0.05, "unembed": 0.01, "stack.moe_blocks.moe.router": 0.01,
                "stack.blocks.attn.wq": 0.03 / 2, "stack.blocks.mlp.w_up": 0.03 / 2,
                "stack.blocks.attn.wo": 0.03 / 2 / 2, "stack.moe_blocks.moe.w_down": 0.03 / 2 / 2}
    for name, std in expected.items():
        assert params[name].std() == pytest.approx(std, rel=0.1), name


def test_attention_scale():
    fixed_head = ModelConfig(d_model=256, n_heads=8, d_head=32, parametrization="mup", mup_base_width=64)
    assert fixed_head.attention_logit_scale == 32**-0.5
    growing_head = ModelConfig(d_model=256, n_heads=4, parametrization="mup", mup_base_width=64)  # h = 64, base 16
    assert growing_head.attention_logit_scale == pytest.approx(16**0.5 / 64)
    at_base = ModelConfig(d_model=64, n_heads=4, parametrization="mup", mup_base_width=64)
    assert at_base.attention_logit_scale == ModelConfig(d_model=64, n_heads=4).attention_logit_scale
    assert dataclasses.replace(growing_head, attention_scale=0.5).attention_logit_scale == 0.5
    assert dataclasses.replace(growing_head, attention_multiplier=2.0).attention_logit_scale == pytest.approx(8**-1)


def test_learning_rate_multipliers_equal_a_hand_written_table():
    """Width 128 on base 32 (m = 4): hidden matrices 1/4, all else 1; and one optimizer step
    moves each parameter by exactly its multiplier times the standard step."""
    cfg = model_config(128, "mup", base=32)
    expected = {
        "embed.table": 1, "pos_embed": 1, "unembed": 1, "final_norm.scale": 1, "final_norm.bias": 1,
        **{f"stack.blocks.{w}": 1 / 4 for w in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_up", "mlp.w_down")},
        **{f"stack.moe_blocks.{w}": 1 / 4 for w in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "moe.w_up",
                                                    "moe.w_down", "moe.shared.w_up", "moe.shared.w_down")},
        "stack.moe_blocks.moe.router": 1,
        **{f"stack.{blocks}.{norm}.{v}": 1 for blocks in ("blocks", "moe_blocks") for norm in ("attn_norm", "mlp_norm")
           for v in ("scale", "bias")},
    }
    params = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)), nnx.Param)
    optim = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=None)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = {}
    for name, parametrization in (("standard", "standard"), ("mup", "mup")):
        optimizer = make_optimizer(optim, 10, params, dataclasses.replace(cfg, parametrization=parametrization))
        updates[name] = leaves(optimizer.update(grads, optimizer.init(params), params)[0])
    assert updates["mup"].keys() == expected.keys()
    for name, multiplier in expected.items():
        np.testing.assert_array_equal(updates["mup"][name], updates["standard"][name] * multiplier, err_msg=name)
    # Adam's epsilon times 1/m (model.mup_scale_adam_eps): gradients 1/4 as large, as µP's are at
    # 4x the base width, give exactly the base width's Adam step, here where epsilon is half of it.
    optim = dataclasses.replace(optim, eps=0.25)

    def first_step(model, scale):
        optimizer = make_optimizer(optim, 10, params, model)
        return leaves(optimizer.update(jax.tree.map(lambda g: g * scale, grads), optimizer.init(params), params)[0])

    at_base = first_step(dataclasses.replace(cfg, parametrization="standard"), 1.0)
    small, unscaled = first_step(dataclasses.replace(cfg, mup_scale_adam_eps=True), 0.25), first_step(cfg, 0.25)
    for name, multiplier in expected.items():
        np.testing.assert_array_equal(small[name], at_base[name] * multiplier, err_msg=name)
        assert np.all(np.abs(unscaled[name]) < np.abs(small[name])), name  # unscaled, epsilon damps the step


def test_learning_rate_multipliers_hold_on_the_master_copy():
    """With bfloat16 params and `optim.master_weights`, µP's per-role multipliers act on the
    float32 master copy: after one step it is exactly the float32 µP step applied to the same
    (bfloat16-representable) weights, so hidden matrices move by 1/m of the standard step."""
    cfg = model_config(128, "mup", base=32, param_dtype="bfloat16")
    bf16 = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)), nnx.Param)
    exact = jax.tree.map(lambda p: p.astype(jnp.float32), bf16)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), exact)
    optim = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=1.0)
    reference = make_optimizer(optim, 10, exact, cfg)
    expected = optax.apply_updates(exact, reference.update(grads, reference.init(exact), exact)[0])
    master = make_optimizer(dataclasses.replace(optim, master_weights=True), 10, bf16, cfg)
    bf16_grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    _, state = master.update(bf16_grads, master.init(bf16), bf16)
    expected, moved = leaves(expected), leaves(state.master)
    assert moved.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(moved[name], expected[name], err_msg=name)


def test_coordinate_check():
    """Widths 64-512, 2 layers, head width 32, d_ff 4x width, 5 steps, 3 seeds, every base
    constant away from its default (µP's epsilon scaled with width): under µP every block
    output's and the logits' width exponent (log-log slope of RMS on width, averaged over the
    steps) is under 0.1 in size, and no step's slope over 0.25 (measured: 0.04, 0.04, 0.01; 0.13);
    under the standard parametrization with the same constants the blocks' outputs grow at
    least as width^1 and the logits grow with width, at every step. Unscaled, this epsilon
    alone puts µP's logits' exponent at -0.17 (docs/scaling.md)."""
    rms, updates = coordinate_data("mup", eps=OFF_DEFAULT_EPS, mup_scale_adam_eps=True, **CONSTANTS)
    mup = width_slopes(rms, WIDTHS)
    assert mup.shape == (5, 3)
    assert np.all(np.abs(width_exponents(rms, WIDTHS)) < 0.1), mup
    assert np.all(np.abs(mup) < 0.25), mup
    hidden = ("wq", "wk", "wv", "wo", "w_up", "w_gate", "w_down")
    assert len(updates) == 11 and sum(name.endswith(hidden) for name in updates) == 7
    for name, moved in updates.items():  # each entry's move: hidden matrices as 1/m, the rest width-free
        expected = -1.0 if name.endswith(hidden) else 0.0
        np.testing.assert_allclose(width_slopes(moved, WIDTHS), expected, atol=0.1, err_msg=name)
    standard = coordinate_check("standard", eps=OFF_DEFAULT_EPS, **CONSTANTS)
    assert np.all(width_slopes(standard, WIDTHS)[:, :-1] > 1.0)  # the blocks' outputs (measured 1.4-3.0)
    assert np.all(standard[-1, :, -1] > standard[0, :, -1])  # 8x the width, larger logits (measured 1.2-2.5x)


@pytest.mark.parametrize("changes, message", [
    (["model.parametrization=mup"], "model.parametrization='mup' needs model.mup_base_width"),
    (["model.parametrization=mup", "model.mup_base_width=0"], "model.mup_base_width must be positive, got 0"),
    (["model.mup_base_width=-64"], "model.mup_base_width must be positive, got -64"),
    (["model.parametrization=mu-p"], "model.parametrization: cannot use 'mu-p'"),
    (["model.logit_multiplier=0"], "model.logit_multiplier must be positive, got 0"),
    (["model.embedding_multiplier=-1"], "model.embedding_multiplier must be positive, got -1"),
    (["model.attention_multiplier=0"], "model.attention_multiplier must be positive, got 0"),
    (["model.init_std_hidden=0"], "model.init_std_hidden must be positive or none, got 0"),
    (["optim.eps=0"], "optim.eps must be positive, got 0"),
    (["model.mup_scale_adam_eps=true"], "model.mup_scale_adam_eps scales Adam's epsilon with µP's width multiplier;"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, changes, message):
    args = [a for change in changes for a in ("--set", change)]
    assert main(["train", *args, "--set", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="needs model.mup_base_width"):
        ModelConfig(parametrization="mup")


MUP = ["--set", "model.parametrization=mup", "--set", "model.mup_base_width=16"]


def test_sweep_applies_one_tuned_learning_rate_under_mup_to_every_width(capsys, tmp_path):
    """`lmjax sweep --set` reaches every run of an IsoFLOP grid that varies width (also in the
    printed launch commands); each run keeps the tuned lr, and µP scales its hidden matrices'."""
    from lmjax.drivers.sweep import load_sweep, run_config

    tuned = ["model.parametrization=mup", "model.mup_base_width=32", "optim.lr=0.004"]
    sweep_dir = tmp_path / "mup"
    assert main(["sweep", "scaling_micro", "--dir", str(sweep_dir), "--commands",
                 *[a for o in tuned for a in ("--set", o)]]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 18 and all(" --set optim.lr=0.004 " in c for c in commands)
    sweep = load_sweep("scaling_micro")
    sweep = dataclasses.replace(sweep, overrides=(*sweep.overrides, *tuned))
    configs = [run_config(sweep, run, sweep_dir) for run in sweep.runs]
    assert {(c.model.parametrization, c.model.mup_base_width, c.optim.lr) for c in configs} == {("mup", 32, 0.004)}
    assert sorted({c.model.width_multiplier for c in configs}) == [0.5, 0.75, 1.0, 1.5, 2.0, 3.0]


def test_plan_shows_the_parametrization_and_export_refuses_a_tied_mup_head_off_its_base_width(capsys, tmp_path):
    assert main(["plan", *MUP, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["parametrization"] == "mup" and planned["mup_width_multiplier"] == 256 / 16
    assert planned["adam_eps"] == 1e-8
    assert main(["plan", *MUP, "--set", "model.mup_scale_adam_eps=true", "--set", "optim.eps=1.6e-7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adam_eps"] == pytest.approx(1e-8)  # 1.6e-7 at width 16, x 16/256
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(model=ModelConfig(d_model=64, n_heads=2, parametrization="mup", mup_base_width=32))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["convert", "to-hf", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which a tied transformers head cannot hold" in err
    assert not (tmp_path / "hf").exists()


def test_export_folds_the_multipliers_into_the_weights():
    """The standard model of the same shape without multipliers, its head, router, queries and
    token embedding multiplied by `multiplier_folding_factors`, computes the logits of the µP
    model with logit and embedding multipliers (here with a growing head width, so the 1/d_head
    attention scale is folded too)."""
    from lmjax.interop.convert import folding_factor, multiplier_folding_factors

    mup_cfg = model_config(64, "mup", base=32, d_head=None, n_heads=4, position="rope", norm="rmsnorm", **CONSTANTS)
    assert mup_cfg.attention_logit_scale != 16**-0.5
    factors = multiplier_folding_factors(mup_cfg)
    standard_cfg = dataclasses.replace(mup_cfg, parametrization="standard", logit_multiplier=1.0,
                                       embedding_multiplier=1.0, attention_multiplier=1.0)
    mup = family_of(mup_cfg).build(mup_cfg, nnx.Rngs(0))
    standard = family_of(standard_cfg).build(standard_cfg, nnx.Rngs(1))
    nnx.update(standard, jax.tree_util.tree_map_with_path(
        lambda path, w: w * folding_factor(factors, tuple(p.key for p in path)),
        nnx.to_pure_dict(nnx.state(mup, nnx.Param))))
    tokens = text_batch(2, 16)["inputs"]
    np.testing.assert_allclose(standard(tokens), mup(tokens), rtol=1e-5, atol=1e-6)
    at_base = dataclasses.replace(mup_cfg, d_model=32)
    assert multiplier_folding_factors(at_base) == {"unembed": 2.0, "router": 1, "wq": 0.5, "embed.table": 4.0}
    plain = dataclasses.replace(at_base, parametrization="standard")
    assert multiplier_folding_factors(plain) == {"unembed": 2.0, "embed.table": 4.0, "wq": 0.5}
    assert multiplier_folding_factors(dataclasses.replace(plain, logit_multiplier=1.0, embedding_multiplier=1.0,
                                                          attention_multiplier=1.0)) == {}
    tied = dataclasses.replace(plain, tie_embeddings=True, logit_multiplier=4.0)
    assert multiplier_folding_factors(tied) == {"embed.table": 4.0, "wq": 0.5}  # the table serves both, times 4
    with pytest.raises(ConfigError, match="which a tied transformers head cannot hold"):
        multiplier_folding_factors(dataclasses.replace(tied, logit_multiplier=2.0))


def test_sharded_mup_run_equals_one_device_and_resumes_as_mup(tmp_path):
    """fsdp 8 on CPU devices (a subprocess) equals the single-device run, which is halted at
    step 3 and resumed: the resumed run is µP again (its config and its optimizer)."""
    sharded = tmp_path / "sharded"
    process = lmjax_subprocess(["train", *TINY, *MUP, *mesh_args(data=1, fsdp=8), "--set", f"train.run_dir={sharded}"])
    single = tmp_path / "single"
    assert main(["train", *TINY, *MUP, "--set", f"train.run_dir={single}", "--set", "train.halt_at_step=3"]) == 0
    assert main(["train", "--resume", str(single), "--set", "train.halt_at_step=none"]) == 0
    finish(process)
    assert [r["step"] for r in read_metrics(single) if "loss" in r] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)
    model, cfg, _ = lmjax.load(single)
    assert (cfg.model.parametrization, cfg.model.mup_base_width, model.cfg.output_multiplier) == ("mup", 16, 0.5)


def test_transfer_sweep_runs_resumably_at_a_tiny_size(tmp_path):
    """experiments/mup_transfer.py: 48 runs (2 parametrizations x 4 widths x 6 learning rates
    a factor 2 apart); one of them, cut to 2 steps, runs, and a second start skips it."""
    from lmjax.drivers.sweep import load_sweep, run_sweep
    from lmjax.scaling.transfer import read_transfer_results

    sweep = load_sweep("mup_transfer")
    assert len(sweep.runs) == 48 and sweep.runs[-1].name == "mup-w512-lr0.016"
    tiny = dataclasses.replace(sweep, runs=sweep.runs[:1], overrides=(
        *sweep.overrides, "train.steps=2", "data.max_bytes=100000", "train.eval_batches=1"))
    log = []
    results = run_sweep(tiny, tmp_path, log=log.append)
    run_sweep(tiny, tmp_path, log=log.append)
    assert log[-1] == "sweep: standard-w64-lr0.0005 finished already, skipped"
    assert list(read_transfer_results(results)) == ["standard"]


def test_base_search_is_valid_mup_at_its_base_width(tmp_path):
    """experiments/mup_base_search.py: 2 anchors + 62 random points, every one a valid config
    of width 64 = µP's base width (so the standard model), within the search's ranges, both
    tied and untied; a run's name carries the values it sets."""
    from lmjax.drivers.sweep import load_sweep, run_config

    sweep = load_sweep("mup_base_search")
    configs = [run_config(sweep, run, tmp_path) for run in sweep.runs]
    assert len(configs) == 64 and sweep.runs[0].name == "r000-lr0.002"
    assert {(c.model.d_model, c.model.mup_base_width, c.model.width_multiplier) for c in configs} == {(64, 64, 1.0)}
    assert all(c.model.mup_scale_adam_eps and c.model.parametrization == "mup" for c in configs)
    assert 20 < sum(not c.model.tie_embeddings for c in configs) < 44
    lrs = [c.optim.lr for c in configs[2:]]
    assert 5e-4 <= min(lrs) < 1e-3 and 1.6e-2 < max(lrs) <= 3.2e-2
    assert f"-lr{configs[7].optim.lr:g}-lm{configs[7].model.logit_multiplier:g}-" in sweep.runs[7].name


def test_tuned_base_is_the_search_winner_and_its_width_sweeps_are_valid(tmp_path):
    """experiments/mup_base.py is the search's winning run; `--set model.parametrization=standard`
    makes it the standard model (Adam's epsilon no longer scaled). mup_base_transfer: µP and the
    standard model at widths 64-512 on learning-rate grids around the base's, named as
    `lmjax.scaling.transfer` reads them; mup_base_widths is its first part."""
    from lmjax.config_parse import override
    from lmjax.drivers.sweep import load_sweep, run_config
    from lmjax.experiment import load_experiment, load_experiment_module
    from lmjax.scaling.transfer import NAME

    base_module, _ = load_experiment_module("mup_base", "")
    search = load_sweep("mup_base_search")
    won = run_config(search, next(r for r in search.runs if r.name == base_module.WINNER_RUN), tmp_path)
    base = load_experiment("mup_base")
    assert (base.model, base.optim, base.data, base.train.steps) == (won.model, won.optim, won.data, won.train.steps)
    standard = override(base, ["model.parametrization=standard"]).model
    assert (standard.parametrization, standard.mup_scale_adam_eps) == ("standard", False)
    with pytest.raises(ConfigError, match="means nothing under"):
        override(base, ["model.parametrization=standard", "model.mup_scale_adam_eps=true"])
    transfer, widths = load_sweep("mup_base_transfer"), load_sweep("mup_base_widths")
    assert (len(widths.runs), len(transfer.runs)) == (2 + 3 * 6, 2 + 3 * 6 + 4 * 4)
    assert transfer.runs[:len(widths.runs)] == widths.runs
    configs = {run.name: run_config(transfer, run, tmp_path) for run in transfer.runs}
    assert all(NAME.match(name) for name in configs)
    at_base = [c for c in configs.values() if c.optim.lr == base.optim.lr]
    assert sorted((c.model.parametrization, c.model.d_model) for c in at_base) == sorted(
        (p, w) for p in ("mup", "standard") for w in (64, 128, 256, 512))
    wide = {c.model.parametrization: c.model for c in at_base if c.model.d_model == 512}
    assert (wide["mup"].n_heads, wide["mup"].d_ff, wide["mup"].adam_eps_multiplier) == (16, 2048, 1 / 8)
    assert (wide["standard"].adam_eps_multiplier, wide["standard"].width_multiplier) == (1.0, 1.0)
    assert {c.model.parametrization for c in map(configs.get, (r.name for r in widths.runs))
            if c.optim.lr != base.optim.lr} == {"standard"}



def test_base_probes_change_one_role_each(tmp_path):
    """experiments/mup_base_probes.py: µP at the base's learning rate, widths 64 and 256; the
    hidden-init probe changes only init_std_hidden; the embedding probe divides the embedding's
    effective learning rate by c while keeping its output at init (std x multiplier) the base's;
    the tied probe ties the table to the head (the base is untied)."""
    from lmjax.drivers.sweep import load_sweep, run_config
    from lmjax.experiment import load_experiment

    base = load_experiment("mup_base").model
    sweep = load_sweep("mup_base_probes")
    configs = {run.name: run_config(sweep, run, tmp_path) for run in sweep.runs}
    assert {(c.model.parametrization, c.optim.lr) for c in configs.values()} == {("mup", 0.0099)}
    assert {c.model.d_model for c in configs.values()} == {64, 256}
    hidden = [c.model for name, c in configs.items() if "-sh" in name]
    assert sorted({m.init_std_hidden / base.init_std_hidden for m in hidden}) == pytest.approx([1, 2, 4, 8])
    assert all((m.init_std_input, m.embedding_multiplier) == (base.init_std_input, base.embedding_multiplier)
               for m in hidden)
    wide = configs["mup-w256-embed_lr0.25"].model
    assert wide.embedding_multiplier == pytest.approx(base.embedding_multiplier / 4)
    assert wide.init_std_input * wide.embedding_multiplier == pytest.approx(base.init_std_input *
                                                                            base.embedding_multiplier)
    assert (wide.init_std_hidden, wide.n_heads, wide.d_ff) == (base.init_std_hidden, 8, 1024)
    assert [c.model.tie_embeddings for c in configs.values()] == [False] * 12 + [True] * 2 + [False] * 8
    assert sorted(c.model.logit_multiplier / base.logit_multiplier for c in configs.values()) == pytest.approx(
        [0.5] * 2 + [1] * 18 + [2] * 2)

def test_optimal_learning_rate_per_width(tmp_path):
    from lmjax.scaling.transfer import (
        grid_steps_moved,
        loss_against_width,
        mean_over_seeds,
        optimal_learning_rates,
        plot_learning_rate_transfer,
        plot_loss_against_width,
        read_transfer_results,
    )

    rows = ["name,val_loss", "mup-w64-lr0.001,3.0", "mup-w64-lr0.002,2.5", "mup-w64-lr0.004,2.7",
            "mup-w128-lr0.001,2.9", "mup-w128-lr0.002,2.4", "mup-w128-lr0.004,2.3", "standard-w64-lr0.001,3.1"]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    table = read_transfer_results(tmp_path / "results.csv")
    assert table["mup"][64] == [(0.001, 3.0), (0.002, 2.5), (0.004, 2.7)]
    assert optimal_learning_rates(table) == {"mup": {64: 0.002, 128: 0.004}, "standard": {64: 0.001}}
    assert grid_steps_moved(optimal_learning_rates(table)["mup"]) == 1
    # A second seed that prefers 0.004 at width 64 by a little: the mean over seeds decides.
    other = {"mup": {64: [(0.001, 3.0), (0.002, 2.6), (0.004, 2.55)], 128: [(0.001, 2.9), (0.002, 2.5)]}}
    mean = mean_over_seeds([table, other])
    assert mean["mup"][64] == [(0.001, 3.0), (0.002, 2.55), (0.004, 2.625)]
    assert mean["mup"][128] == [(0.001, 2.9), (0.002, 2.45)]  # only the points both seeds have
    assert "standard" not in mean
    paths = plot_learning_rate_transfer(table, tmp_path / "plots", seeds=[table, other])
    assert [p.name for p in paths] == ["lr_transfer_mup.png", "lr_transfer_standard.png"] and paths[0].stat().st_size
    # Loss against width: tuned per width, and at one learning rate (standard has one only: no tuned curve).
    curves = loss_against_width(table, at_lr=0.002)
    assert curves == {"mup tuned per width": {64: 2.5, 128: 2.3}, "mup at lr 0.002": {64: 2.5, 128: 2.4}}
    assert loss_against_width(table, at_lr=0.0020004)["mup at lr 0.002"] == {64: 2.5, 128: 2.4}  # names round
    assert plot_loss_against_width(curves, tmp_path / "plots", [curves]).stat().st_size
