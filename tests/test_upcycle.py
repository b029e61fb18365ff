"""`lmjax upcycle`: a dense run's weights as a MoE run (experts copied, routers new).

References: the dense run itself (the upcycled model's eval loss and logits equal the dense
model's), hand-written layer indices for the every > 1 re-split, and transformers' Llama
against the exported Mixtral."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs torch and transformers
import transformers
from conftest import tiny_config
from flax import nnx

from lmjax.checkpoint import Checkpointer, write_weights_run
from lmjax.cli import main
from lmjax.config import ConfigError, MeshConfig
from lmjax.config_parse import read_config
from lmjax.parallel import make_mesh
from lmjax.runs import evaluate_run
from lmjax.train.state import abstract_model
from lmjax.upcycle import upcycle_params

TOLERANCE = 1e-5  # float32 rounding of gates that sum to 1


def random_weights(model, seed=0):
    """Weights of the shape of `model`'s: normal(0, 0.2), norm scales normal(1, 0.2), drawn by
    NumPy (compiling the model's initialisers would cost more than this file's tests). At this
    scale every layer matters (logits far from uniform), so a misplaced layer changes the loss."""
    rng = np.random.default_rng(seed)
    flat = [(path, v.replace(jnp.asarray(rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.2, v.shape), v.dtype)))
            for path, v in nnx.to_flat_state(abstract_model(model)[1])]
    return nnx.from_flat_state(flat)


def write_dense_run(run_dir, family="decoder", **model):
    """A weights-only run of a random dense model (`random_weights`)."""
    cfg = tiny_config(run_dir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family=family, **model))
    params = random_weights(cfg.model)
    write_weights_run(run_dir, cfg.to_dict(), params)
    return cfg


@pytest.mark.parametrize("family, model, moe", [
    ("decoder", {}, ["model.moe.n_experts=4", "model.moe.router=sigmoid", "model.moe.bias_update_rate=0.001"]),
    ("encoder", {"n_layers": 4, "mlp": "gelu"}, ["model.moe.n_experts=4", "model.moe.every=2", "model.moe.top_k=1"]),
    ("encoder_decoder", {"n_layers": 2, "n_decoder_layers": 4}, ["model.moe.every=2"]),
])
def test_upcycled_run_evaluates_to_the_dense_loss(tmp_path, family, model, moe):
    write_dense_run(tmp_path / "dense", family, **model)
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"),
                 *[a for m in moe for a in ("--set", m)]]) == 0
    dense, upcycled = (evaluate_run(tmp_path / name, max_batches=1) for name in ("dense", "moe"))
    assert abs(dense["loss"] - np.log(384)) > 0.1  # far from uniform: the layers matter
    assert upcycled["loss"] == pytest.approx(dense["loss"], abs=TOLERANCE, rel=0)
    checkpointer = Checkpointer(tmp_path / "moe")
    assert not checkpointer.holds_optimizer_state()  # the weights alone, as lora merge writes
    checkpointer.close()


def dense_params(**model):
    cfg = tiny_config(None)
    model_cfg = dataclasses.replace(cfg.model, **model)
    return model_cfg, random_weights(model_cfg)


def test_every_3_re_splits_the_stacked_layers_by_hand():
    """6 layers, MoE every 3rd: dense layers 0, 1, 3, 4 go to `blocks`, layers 2 and 5 to
    `moe_blocks` (attention and norms as they are, the MLP copied into each expert); the routers
    are new, normal(0, model.init_std) as a MoE model's."""
    dense_cfg, dense = dense_params(n_layers=6)
    moe_cfg = dataclasses.replace(dense_cfg, moe=dataclasses.replace(dense_cfg.moe, n_experts=3, every=3))
    moe = upcycle_params(dense, moe_cfg, make_mesh(MeshConfig()), seed=5)
    stack = jax.tree.map(np.asarray, dense["stack"]["blocks"])
    mlp = stack["mlp"]
    for name in ("wq", "wo"):
        np.testing.assert_array_equal(moe["stack"]["blocks"]["attn"][name][...], stack["attn"][name][...][[0, 1, 3, 4]])
        np.testing.assert_array_equal(moe["stack"]["moe_blocks"]["attn"][name][...], stack["attn"][name][...][[2, 5]])
    np.testing.assert_array_equal(moe["stack"]["blocks"]["mlp"]["w_up"][...], mlp["w_up"][...][[0, 1, 3, 4]])
    for name in ("w_up", "w_gate", "w_down"):
        experts = moe["stack"]["moe_blocks"]["moe"][name][...]  # (2 MoE layers, 3 experts, ...)
        for r, layer in enumerate([2, 5]):
            for e in range(3):
                np.testing.assert_array_equal(experts[r, e], mlp[name][...][layer])
    np.testing.assert_array_equal(moe["embed"]["table"][...], dense["embed"]["table"][...])
    router = np.asarray(moe["stack"]["moe_blocks"]["moe"]["router"][...])  # (2, D, E)
    assert router.shape == (2, 32, 3) and abs(router.std() / moe_cfg.init_std - 1) < 0.2
    assert not np.allclose(router[0], router[1])


def test_noise_perturbs_each_copy_by_its_relative_std_and_is_seeded():
    dense_cfg, dense = dense_params()
    moe_cfg = dataclasses.replace(dense_cfg, moe=dataclasses.replace(dense_cfg.moe, n_experts=4))
    mesh = make_mesh(MeshConfig())
    w = np.asarray(dense["stack"]["blocks"]["mlp"]["w_up"][...])[:, None]  # (L, 1, D, F)

    def experts(noise, seed):
        return np.asarray(upcycle_params(dense, moe_cfg, mesh, noise, seed)["stack"]["blocks"]["moe"]["w_up"][...])

    noisy = experts(0.1, 0)
    relative = noisy / w - 1  # (L, E, D, F): 0.1 * N(0, 1), independent per copy
    assert abs(relative.std() - 0.1) < 0.005 and abs(relative.mean()) < 0.005
    assert np.abs(np.corrcoef(relative[:, 0].ravel(), relative[:, 1].ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(experts(0.1, 0), noisy)  # seeded


def test_a_llama_import_upcycles_into_a_mixtral_with_the_llamas_logits(tmp_path):
    """transformers' Llama -> convert from-hf -> upcycle -> convert to-hf: MixtralForCausalLM
    computes the Llama's logits; `train --init-from` accepts the run (its checks, as for any
    weights-only run: tests/test_interop.py trains from one)."""
    from lmjax.interop.convert import from_hf, to_hf
    from lmjax.train.resume import check_init_from

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, initializer_range=0.1)).eval()
    llama.save_pretrained(tmp_path / "llama")
    from_hf(tmp_path / "llama", tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--noise", "0"]) == 0
    to_hf(tmp_path / "moe", tmp_path / "mixtral")
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM" and mixtral.config.num_local_experts == 8
    ids = np.random.default_rng(0).integers(0, 512, (2, 12))
    with torch.no_grad():
        reference, exported = (m(torch.tensor(ids)).logits.numpy() for m in (llama, mixtral))
    assert np.abs(reference).max() > 0.1  # not a vanishing function
    np.testing.assert_allclose(exported, reference, atol=1e-4, rtol=0)
    cfg = read_config(tmp_path / "moe" / "config.json")
    check_init_from(cfg, tmp_path / "moe")
    with pytest.raises(ConfigError, match="--init-from"):
        check_init_from(read_config(tmp_path / "dense" / "config.json"), tmp_path / "moe")


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    write_dense_run(tmp_path / "dense")
    write_dense_run(tmp_path / "moe", moe=dataclasses.replace(tiny_config(None).model.moe, n_experts=4))
    (tmp_path / "taken").mkdir()
    cases = [
        ("moe", [], "already a MoE model"),
        ("dense", ["--set", "model.d_model=64"], "model.moe.* fields only"),
        ("dense", ["--set", "optim.lr=1e-3"], "model.moe.* fields only"),
        ("dense", ["--set", "model.moe.dispatch=capacity"], "dispatch='capacity'"),
        ("dense", ["--set", "model.moe.renormalize=false"], "renormalize=false"),
        ("dense", ["--set", "model.moe.n_shared_experts=1"], "n_shared_experts=1"),
        ("dense", ["--set", "model.moe.d_ff=32"], "model.moe.d_ff=32"),
        ("dense", ["--set", "model.moe.granularity=2"], "model.moe.granularity=2"),
        ("dense", ["--set", "model.moe.n_experts=0"], "leaves the model dense"),
        ("dense", ["--set", "model.moe.top_k=9"], "top_k=9"),
        ("dense", ["--noise", "-0.1"], "--noise"),
        ("nowhere", [], "not a run directory"),
    ]
    for source, extra, message in cases:
        code, lines = run_cli(capsys, "upcycle", tmp_path / source, "--out", tmp_path / "out", *extra)
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)
        assert not (tmp_path / "out").exists()
    code, lines = run_cli(capsys, "upcycle", tmp_path / "dense", "--out", tmp_path / "taken")
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0], lines
    assert not any((tmp_path / "taken").iterdir())
