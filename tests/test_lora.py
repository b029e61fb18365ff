"""LoRA: adapters on frozen weights, for every family; training, resume and merge of a tiny run."""

import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, xla_flags
from flax import nnx

import lmjax
from lmjax.adapters import weight_transforms
from lmjax.adapters.lora import LoRA, LowRankWeight, fold, init_adapters, low_rank, matrix_split, path_name, targeted
from lmjax.checkpoint import Checkpointer
from lmjax.cli import main
from lmjax.config import ConfigError, LoRAConfig, ModelConfig, MoEConfig
from lmjax.families import family_of
from lmjax.runs import restore_weights, train

BASE = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
FAMILIES = {
    "decoder": BASE,
    "encoder": dataclasses.replace(BASE, family="encoder", position="learned", norm="layernorm", mlp="gelu"),
    "encoder_decoder": dataclasses.replace(BASE, family="encoder_decoder", n_decoder_layers=1, position="relative"),
    "moe": dataclasses.replace(BASE, moe=MoEConfig(n_experts=4, top_k=2, every=2)),
}
LORA = LoRAConfig(rank=3, alpha=6.0)
# the training step's branch form is checked on every family, the decoder with dropout and a remat policy that
# saves by name
BRANCH_MODELS = {**FAMILIES, "decoder_dropout_remat": dataclasses.replace(BASE, dropout=0.1,
                                                                          remat="save_dot_except_mlp")}


@functools.cache
def family_params(family: str) -> nnx.State:
    cfg = BRANCH_MODELS[family]
    return jax.jit(lambda: nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0))))()  # one compile, not per op


def random_adapters(lora, params, seed=1):
    """Adapters with A and B both drawn at random, as after some training."""
    adapters = init_adapters(lora, params, seed)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    return jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_b_zero_the_lora_model_is_the_base_model(family):
    """Every weight the model reads is the base's, bit for bit, so its outputs are the base's."""
    params = family_params(family)
    folded = fold(params, init_adapters(LORA, params, 0), LORA)
    assert jax.tree.structure(folded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(folded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_weight_applies_base_plus_scaled_low_rank_update_at_every_position(family):
    """Reference: x W + (alpha / r) (x A) B in float64, per layer and expert, for every targeted weight."""
    params = family_params(family)
    adapters = random_adapters(LORA, params)
    folded = dict(nnx.to_flat_state(fold(params, adapters, LORA)))
    pairs = dict(nnx.to_flat_state(adapters))
    chosen = targeted(LORA, params)
    for path, weight in chosen.items():
        stacked, inputs = matrix_split(weight.out_sharding)
        w = np.asarray(weight[...], np.float64)
        lead, n_in = w.shape[:stacked], int(np.prod(w.shape[stacked:stacked + inputs]))
        w = w.reshape(-1, n_in, w.size // (int(np.prod(lead)) * n_in))
        merged = np.asarray(folded[path][...], np.float64).reshape(w.shape)
        a = np.asarray(pairs[(*path, "lora_a")][...], np.float64).reshape(w.shape[0], n_in, LORA.rank)
        b = np.asarray(pairs[(*path, "lora_b")][...], np.float64).reshape(w.shape[0], LORA.rank, -1)
        x = np.random.default_rng(2).normal(size=(5, n_in))  # five positions
        for i in range(w.shape[0]):
            np.testing.assert_allclose(x @ merged[i], x @ w[i] + LORA.alpha / LORA.rank * (x @ a[i]) @ b[i],
                                       atol=1e-5, rtol=0)
    untouched = [p for p, _ in nnx.to_flat_state(params) if p not in chosen]
    assert untouched and all(np.array_equal(folded[p][...], dict(nnx.to_flat_state(params))[p][...]) for p in untouched)


def test_roles_reach_experts_and_cross_attention_and_regex_picks_paths():
    names = {f: sorted(path_name(p) for p in targeted(LORA, family_params(f))) for f in FAMILIES}
    assert "stack/moe_blocks/moe/w_up" in names["moe"] and "stack/moe_blocks/moe/router" not in names["moe"]
    assert "decoder/blocks/cross_attn/wq" in names["encoder_decoder"]
    assert len(names["decoder"]) == 7  # wq wk wv wo w_up w_gate w_down
    only_q = targeted(LoRAConfig(rank=2, targets=r"attn/wq$"), family_params("decoder"))
    assert [path_name(p) for p in only_q] == ["stack/blocks/attn/wq"]
    params = family_params("decoder")
    adapters = dict(nnx.to_flat_state(init_adapters(LORA, params, 0)))
    wo_a, wo_b = adapters[("stack", "blocks", "attn", "wo", "lora_a")], adapters[("stack", "blocks", "attn", "wo",
                                                                                    "lora_b")]
    assert wo_a.shape == (2, 4, 8, 3) and wo_a.out_sharding == ("layers", "heads", "head_dim", "lora_rank")
    assert wo_b.shape == (2, 3, 32) and wo_b.out_sharding == ("layers", "lora_rank", "embed")


def family_batch(model: ModelConfig, rows: int = 2, seq_len: int = 16) -> dict:
    """A (rows, ...) training batch of the family's objective, from a few lines of code."""
    from lmjax.config import Config, DataConfig
    from lmjax.data import ByteTokenizer, PackedDataset, tokenize
    from lmjax.train.datasets import family_examples

    cfg, tokenizer = Config(model=model, data=DataConfig(seq_len=seq_len)), ByteTokenizer()
    windows = PackedDataset(tokenize(["def f(x):\n    return x + 1\n" * 40], tokenizer),
                            family_of(model).window_length(cfg))
    examples = family_examples(windows, cfg, tokenizer, 0)
    return {k: jnp.stack([examples[i][k] for i in range(rows)]) for k in examples[0]}


@pytest.mark.parametrize("family", [f for f in BRANCH_MODELS if f != "decoder"])
def test_branch_form_gives_the_folded_forms_loss_and_adapter_gradients(family):
    """Training applies x W + (alpha / r) (x A) B (`low_rank`); the reference folds
    W + (alpha / r) A B first (`fold`). Loss and gradients of A and B agree in float32. Beside
    attention and MLP (experts included), the targets take in what is read otherwise: embedding
    tables (rows looked up, and the tied output head), learned positions, relative-bias tables
    and the router."""
    from lmjax.train.losses import causal_lm_loss

    lora = dataclasses.replace(LORA, targets="attention,mlp,table,router,pos_embed")

    model_cfg, params = BRANCH_MODELS[family], family_params(family)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: family_of(model_cfg).build(model_cfg, nnx.Rngs(0))))
    batch = family_batch(model_cfg)
    key = jax.random.key(3) if model_cfg.dropout else None

    def loss(adapters, form):
        model = nnx.merge(graphdef, form(params, adapters, lora))
        loss_sum, count = causal_lm_loss(family_of(model_cfg).predict(model, batch, key), batch["targets"],
                                         batch["loss_mask"])
        return loss_sum / count

    both = jax.jit(lambda a: [jax.value_and_grad(loss)(a, form) for form in (low_rank, fold)])
    (branch_loss, branch_grads), (folded_loss, folded_grads) = both(random_adapters(lora, params))
    np.testing.assert_allclose(branch_loss, folded_loss, rtol=1e-6)
    assert len(jax.tree.leaves(branch_grads)) == 2 * len(targeted(lora, params))
    for got, want in zip(jax.tree.leaves(branch_grads), jax.tree.leaves(folded_grads)):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dispatch, kernel", [("capacity", "auto"), ("dropless", "blocks"),
                                              ("dropless", "ragged_dot")])
def test_experts_apply_their_own_adapters_in_every_dispatch(dispatch, kernel):
    """A MoE layer whose expert weights are `LowRankWeight`s (per-expert A and B) gives the
    output of the layer with each expert's W + scale A B folded in, and the same gradients."""
    from lmjax.models.moe import MoE

    cfg = dataclasses.replace(BASE, moe=MoEConfig(n_experts=4, top_k=2, dispatch=dispatch, grouped_matmul=kernel))
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 8, BASE.d_model))
    keys = iter(jax.random.split(jax.random.key(2), 6))
    adapters = {name: (0.3 * jax.random.normal(next(keys), (4, BASE.d_model if name != "w_down" else 48, 3)),
                       0.3 * jax.random.normal(next(keys), (4, 3, 48 if name != "w_down" else BASE.d_model)))
                for name in ("w_up", "w_gate", "w_down")}

    def output(adapters, read):
        weights = {**params, **{name: params[name].replace(read(LowRankWeight(params[name][...], a, b, 2.0)))
                                for name, (a, b) in adapters.items()}}
        return nnx.merge(graphdef, nnx.State(weights))(x)

    def both(adapters):
        return [jax.value_and_grad(lambda a, r=read: jnp.sum(jnp.sin(output(a, r))))(adapters)
                for read in (lambda w: w, LowRankWeight.folded)]

    (branch, branch_grads), (folded, folded_grads) = jax.jit(both)(adapters)
    np.testing.assert_allclose(branch, folded, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(branch_grads), jax.tree.leaves(folded_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


SHARDED_BRANCH = """
import dataclasses, functools, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, "tests")
from test_lora import LORA, family_batch, random_adapters
from lmjax.config import MeshConfig, ModelConfig, MoEConfig
from lmjax.families import family_of
from lmjax.adapters.lora import low_rank
from lmjax.parallel import batch_sharding, make_mesh, state_shardings
from lmjax.train.losses import causal_lm_loss

cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                  moe=MoEConfig(n_experts=4, top_k=2, every=2, grouped_matmul="blocks"))
graphdef, params = nnx.split(family_of(cfg).build(cfg, nnx.Rngs(0)))
adapters = random_adapters(LORA, params)
batch = family_batch(cfg, rows=8)

def loss_and_grads(adapters, params, batch):
    def loss(adapters):
        model = nnx.merge(graphdef, low_rank(params, adapters, LORA))
        loss_sum, count = causal_lm_loss(family_of(cfg).predict(model, batch), batch["targets"], batch["loss_mask"])
        return loss_sum / count
    return jax.value_and_grad(loss)(adapters)

reference = jax.jit(loss_and_grads)(adapters, params, batch)  # one device
for axes in (dict(data=1, fsdp=2, tensor=2, expert=2),):
    mesh = make_mesh(MeshConfig(**axes))
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(tree, state_shardings(tree, mesh)) for tree in (adapters, params)]
        loss, grads = jax.jit(loss_and_grads)(*sharded, jax.device_put(batch, batch_sharding(mesh)))
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    a = dict(nnx.to_flat_state(sharded[0]))[("stack", "moe_blocks", "moe", "w_up", "lora_a")]
    print("equal", axes, a[...].sharding.spec)
"""


def test_sharded_branch_form_equals_one_device():
    """Adapters sharded by their logical axes with the base (fsdp x tensor x expert, 2 each):
    the branch form's loss and adapter gradients, experts included (the expert-parallel
    dropless path), equal one device's."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_BRANCH], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("equal") == 1, result.stdout
    assert "P(None, 'expert', 'fsdp', None)" in result.stdout, result.stdout  # (layers, expert, embed, lora_rank)


@pytest.mark.parametrize("lora, message", [
    (LoRAConfig(rank=2, targets="nothing_here"), "matches no weight"),
    (LoRAConfig(rank=33), "exceeds the smaller side"),
    (LoRAConfig(rank=2, targets="norm"), "not a matrix"),
    (LoRAConfig(rank=2, targets="attn/w[q"), "valid regular expression"),
])
def test_bad_targets_and_ranks_are_one_clear_error(lora, message):
    with pytest.raises(ConfigError, match=message):
        targeted(lora, family_params("decoder"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base run and a LoRA run on it, trained straight and with a stop and resume."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_config(root / "base", steps=2, eval_every=100, eval_batches=1, sample_tokens=0)
    train(base, root / "base")
    checksum = checkpoint_checksum(root / "base")
    lora = dataclasses.replace(tiny_config(root / "lora", steps=4, eval_every=100, eval_batches=1, sample_tokens=0,
                                           checkpoint_every=2),
                               lora=LoRAConfig(rank=4, alpha=8.0))
    train(lora, root / "lora", init_from=root / "base")
    shutil.copytree(root / "lora", root / "resumed")  # then drop the last checkpoint and resume from step 2
    shutil.rmtree(root / "resumed" / "checkpoints" / "4")
    resumed = lmjax.runs.load_config(root / "resumed")  # as `lmjax train --resume` reads it
    assert train(dataclasses.replace(resumed, train=dataclasses.replace(resumed.train, run_dir=str(root / "resumed"))),
                 root / "resumed")["finished"]
    return root, checksum


def checkpoint_checksum(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((run_dir / "checkpoints").rglob("*")):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def saved_state(run_dir):
    from lmjax.checkpoint import Checkpointer
    from lmjax.config import MeshConfig
    from lmjax.parallel import make_mesh
    from lmjax.train.optimizer import make_optimizer
    from lmjax.train.state import abstract_train_state

    cfg = lmjax.runs.load_config(run_dir)
    _, abstract, _ = abstract_train_state(cfg.model, lambda p: make_optimizer(cfg.optim, cfg.train.steps, p, cfg.model),
                                          make_mesh(MeshConfig()), weight_transforms(cfg))
    checkpointer = Checkpointer(run_dir, async_save=False)
    state, _, _ = checkpointer.restore(abstract)
    checkpointer.close()
    return state


def test_only_the_adapters_train_and_are_saved(runs):
    root, checksum = runs
    assert checkpoint_checksum(root / "base") == checksum  # the base run is bit-identical
    state = saved_state(root / "lora")
    paths = [path_name(p) for p, _ in nnx.to_flat_state(state.params)]
    assert paths and all(p.endswith(("/lora_a", "/lora_b")) for p in paths)
    adapter_count = sum(x.size for x in jax.tree.leaves(state.params))
    optimizer_count = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert optimizer_count <= 2 * adapter_count + 16  # Adam's two moments of the adapters, and counters
    assert all(np.abs(np.asarray(v[...])).max() > 0 for p, v in nnx.to_flat_state(state.params) if p[-1] == "lora_b")
    cfg, _, merged, _, _ = restore_weights(root / "lora")
    _, _, base, _, _ = restore_weights(root / "base")
    chosen = targeted(cfg.lora, base)
    for path, weight in nnx.to_flat_state(base):
        after = np.asarray(dict(nnx.to_flat_state(merged))[path][...])
        assert np.array_equal(after, np.asarray(weight[...])) == (path not in chosen)


def test_a_lora_run_resumes_exactly(runs):
    root, _ = runs
    straight, resumed = saved_state(root / "lora"), saved_state(root / "resumed")
    assert int(straight.step) == int(resumed.step) == 4
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_merge_writes_a_run_with_the_lora_models_logits(runs, capsys):
    root, _ = runs
    assert main(["lora", "merge", str(root / "lora"), "--out", str(root / "merged")]) == 0
    lora_model, cfg, _ = lmjax.load(root / "lora")
    merged_model, merged_cfg, _ = lmjax.load(root / "merged")
    assert not merged_cfg.lora.enabled and merged_cfg.model == cfg.model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 16)))
    np.testing.assert_allclose(np.asarray(merged_model(ids)), np.asarray(lora_model(ids)), atol=1e-5, rtol=0)
    checkpointer = Checkpointer(root / "merged")
    assert not checkpointer.holds_optimizer_state()  # the weights alone, as convert from-hf writes
    checkpointer.close()
    assert main(["lora", "merge", str(root / "merged"), "--out", str(root / "again")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
    assert not (root / "again").exists()


def test_lora_without_a_base_run_is_one_clear_error(capsys, tmp_path):
    assert main(["train", "--set", "lora.rank=4", "--set", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "give --init-from RUN_DIR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("setting, name", [("lora.rank=4", "lora"), ("quant.weights=int8", "qat")])
def test_a_feature_without_its_weight_transform_is_refused(setting, name, tmp_path):
    """The trainer asks its weight transforms, never the config, how to train: a config that turns
    LoRA or QAT on, handed to the trainer without that transform, is one clear error, and nothing
    is written."""
    from lmjax.config_parse import override
    from lmjax.train.loop import train as train_without_transforms

    cfg = override(tiny_config(tmp_path / "run"), [setting])
    with pytest.raises(ConfigError, match=f"{setting} needs the {name} weight transform") as error:
        train_without_transforms(cfg, tmp_path / "run")
    assert len(str(error.value).splitlines()) == 1 and not (tmp_path / "run").exists()


def test_lora_on_a_base_trained_with_another_tokenizer_is_refused(capsys, tmp_path):
    """The adapters' base reads token ids as its own tokenizer wrote them: a LoRA run whose
    data.tokenizer is not the base run's saved one is refused in one line, before any weight is read."""
    import json

    from lmjax.config_parse import override
    from lmjax.experiment import load_experiment

    sets = ["data.max_bytes=100000", f"train.run_dir={tmp_path / 'lora'}"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(override(load_experiment("decoder_tiny"), sets).to_dict()))
    (base / "tokenizer.json").write_text("{}")  # trained with a subword tokenizer; the LoRA run uses bytes
    args = ["train", "--init-from", str(base), "--set", "lora.rank=4"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not that run's tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lora").exists()


def test_plan_counts_the_adapters_memory_by_hand(tmp_path):
    from lmjax.cli import transform_bytes
    from lmjax.scaling.plan import plan

    full = tiny_config(tmp_path)  # d_model 32, 2 layers, 4 heads of 8, 2 kv heads, d_ff 64, swiglu
    lora = dataclasses.replace(full, lora=LoRAConfig(rank=4))
    per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))  # wq wk wv wo up gate down
    targeted_per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    a, b = plan(full), plan(lora, **transform_bytes(lora))
    assert b["memory_adam_bytes"] == 2 * 2 * per_layer * 4
    assert b["memory_gradients_bytes"] == b["memory_adapters_bytes"] == 2 * per_layer * 4  # nothing weight-sized
    assert a["memory_gradients_bytes"] - b["memory_gradients_bytes"] > 2 * targeted_per_layer * 4
    assert b["memory_weights_bytes"] == a["memory_weights_bytes"]
    assert b["memory_train_bytes"] < a["memory_train_bytes"]


def compiled_step_memory(lora: LoRAConfig | None):
    """XLA's memory analysis of the train step of a decoder whose weights dominate (d_model 128,
    d_ff 512, 8 tokens a step), full fine-tuning or LoRA; and that config."""
    from lmjax.config import Config, DataConfig, MeshConfig, OptimConfig, TrainConfig
    from lmjax.parallel import batch_sharding, make_mesh
    from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
    from lmjax.train.state import abstract_model, abstract_train_state
    from lmjax.train.step import make_train_step

    model = ModelConfig(d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab_size=384, max_seq_len=16)
    cfg = Config(model=model, data=DataConfig(seq_len=8), train=TrainConfig(batch_size=1), optim=OptimConfig(),
                 lora=lora or LoRAConfig())
    mesh = make_mesh(MeshConfig())
    transforms = (LoRA(lora),) if lora else ()
    graphdef, abstract, optimizer = abstract_train_state(model, lambda p: make_optimizer(cfg.optim, 10, p), mesh,
                                                         transforms)
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, 10), 1, False, model.moe,
                           transforms)
    batch = {k: jax.ShapeDtypeStruct((1, 8), dtype, sharding=batch_sharding(mesh)) for k, dtype in (
        ("inputs", jnp.int32), ("targets", jnp.int32), ("positions", jnp.int32), ("segment_ids", jnp.int32),
        ("loss_mask", jnp.float32))}
    frozen = [abstract_model(model)[1]] if lora else []
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=0).lower(abstract, batch, *frozen).compile()
    return compiled.memory_analysis(), cfg, 5 * 8 * 4  # and the batch's bytes


def test_the_lora_step_holds_no_weight_sized_gradient_and_plan_counts_its_arguments():
    """Full fine-tuning's temporaries hold the gradient of every weight; LoRA's step
    differentiates the adapters alone, so its temporaries are smaller by at least the targeted
    weights' bytes (folding W + (alpha / r) A B into the weights, as the step once did, would
    instead add that copy and its gradient: twice those bytes more). And `lmjax plan`'s
    weights + adapters + Adam moments are the compiled LoRA step's arguments, less the batch."""
    from lmjax.adapters.lora import adapted_sizes
    from lmjax.cli import transform_bytes
    from lmjax.scaling.memory import memory_estimate

    full, _, _ = compiled_step_memory(None)
    lora, cfg, batch_bytes = compiled_step_memory(LoRAConfig(rank=4))
    targeted_bytes = adapted_sizes(cfg.lora, cfg.model)[0] * 4
    assert full.temp_size_in_bytes - lora.temp_size_in_bytes >= targeted_bytes, (full.temp_size_in_bytes,
                                                                              lora.temp_size_in_bytes, targeted_bytes)
    plan = memory_estimate(cfg, **transform_bytes(cfg))
    counted = plan["memory_weights_bytes"] + plan["memory_adapters_bytes"] + plan["memory_adam_bytes"]
    compiled_bytes = lora.argument_size_in_bytes - batch_bytes
    assert abs(counted - compiled_bytes) / compiled_bytes < 0.02


def test_peft_export_on_the_exported_base_gives_the_lmjax_logits(tmp_path):
    """A tiny random Llama from transformers, imported; a LoRA run on it; its base exported with
    to-hf and its adapters with export-peft; peft's model within 1e-4 of lmjax's."""
    import peft  # the test extra installs torch, transformers and peft
    import torch
    import transformers

    from lmjax.config_parse import read_config
    from lmjax.interop.convert import from_hf

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "base")
    imported = read_config(tmp_path / "base" / "config.json")
    tiny = tiny_config(tmp_path / "lora", steps=2, eval_every=100, eval_batches=1, sample_tokens=0, batch_size=4)
    cfg = dataclasses.replace(tiny, model=imported.model, lora=LoRAConfig(rank=4, alpha=32.0),
                              optim=dataclasses.replace(tiny.optim, lr=0.05, warmup_steps=0))
    train(cfg, tmp_path / "lora", init_from=tmp_path / "base")
    assert main(["convert", "to-hf", str(tmp_path / "base"), "--out", str(tmp_path / "hf_base")]) == 0
    assert main(["lora", "export-peft", str(tmp_path / "lora"), "--out", str(tmp_path / "peft")]) == 0

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = np.random.default_rng(0).integers(0, 384, (2, 16))
    with torch.no_grad():
        theirs = adapted(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lmjax.load(tmp_path / "lora")[0](jnp.asarray(ids)))
    before = np.asarray(lmjax.load(tmp_path / "base")[0](jnp.asarray(ids)))
    assert np.abs(ours - before).max() > 1e-2  # the adapters matter, so dropping them would fail below
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
