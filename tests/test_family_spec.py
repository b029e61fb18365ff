"""The family spec: one home per family, and what it fixed (mixture weights, memory counts)."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig
from lmjax.data import BatchIterator, ByteTokenizer, Mixture, PackedDataset, tokenize
from lmjax.families import FAMILIES, family_of
from lmjax.parallel import batch_sharding, make_mesh
from lmjax.scaling.counting import param_counts
from lmjax.scaling.memory import memory_estimate, mesh_sizes, param_elements_per_device
from lmjax.train.datasets import DATA_ORDER_VERSION, check_data_order, family_examples
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import abstract_train_state
from lmjax.train.step import make_train_step

LMJAX = Path(__file__).resolve().parents[1] / "lmjax"
FAMILY_NAMES = set(FAMILIES)
TOKENIZER = ByteTokenizer()


def _family_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare anything named `family` (`cfg.family == ...`, `family in (...)`) or
    build a dict keyed by family names."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            named = [n for operand in (node.left, *node.comparators) for n in ast.walk(operand)]
            if any(isinstance(n, ast.Attribute) and n.attr == "family" or isinstance(n, ast.Name) and n.id == "family"
                   for n in named):
                lines.append(node.lineno)
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys) > 1 and keys <= FAMILY_NAMES and len(keys) == len(node.keys):
                lines.append(node.lineno)
    return lines


def test_no_module_but_the_spec_and_the_config_compares_a_family_name():
    """The registry (families.py) picks a family; config.py validates the choices. Nothing else
    asks which family it has."""
    found = {}
    for path in sorted(LMJAX.rglob("*.py")):
        if path.name in ("families.py", "config.py") and path.parent == LMJAX:
            continue
        lines = _family_comparisons(ast.parse(path.read_text()))
        if lines:
            found[str(path.relative_to(LMJAX))] = lines
    assert found == {}
    example = "a = cfg.family == 'encoder'\nb = family in ('decoder',)\nc = {'decoder': 1, 'encoder': 2}\nd = {'x': 1}"
    assert _family_comparisons(ast.parse(example)) == [1, 2, 3]  # the check can fail


def test_config_imports_no_data_code():
    """Building the default config loads neither the data stack (grain) nor wandb."""
    code = ("import sys, lmjax.config; lmjax.config.Config(); "
            "print(sorted(m for m in ('grain', 'wandb', 'lmjax.data', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_layers_point_one_way():
    """config imports no lmjax module but the span arithmetic (tests/test_layers.py holds the
    whole layer order)."""
    assert {m for m in _imports(LMJAX / "config.py") if m.startswith("lmjax")} == {"lmjax.spans"}


def _config(family: str) -> Config:
    return Config(model=ModelConfig(family=family, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64),
                  data=DataConfig(seq_len=32))


@pytest.mark.parametrize("family", sorted(FAMILY_NAMES))
def test_mixture_weights_hold_for_every_family(family):
    """data.path=A:0.9,B:0.1: 90% +- 2% of the examples come from A, whatever the objective."""
    cfg = _config(family)
    window = family_of(cfg.model).window_length(cfg)
    parts = [PackedDataset(tokenize([letter * 20_000], TOKENIZER), window) for letter in "ab"]
    examples = family_examples(Mixture(parts, [0.9, 0.1]), cfg, TOKENIZER, seed=0)
    batches = BatchIterator(examples, 50, seed=3)
    from_a = [bool(np.isin(row, [ord("a")]).any()) for _ in range(40) for row in next(batches)["targets"]]
    assert abs(np.mean(from_a) - 0.9) <= 0.02


def test_runs_saved_before_the_mixture_fix_refuse_to_resume():
    mixture = DataConfig(path="/data/a:0.9,/data/b:0.1", seq_len=32)
    for family in ("encoder", "encoder_decoder"):
        cfg = dataclasses.replace(_config(family), data=mixture)
        with pytest.raises(ConfigError, match="cannot resume: .* data order version 1, which ignored the mixture"):
            check_data_order(cfg, {"step": 3, "seed": 0, "weights": [1.0]})
        check_data_order(cfg, {"step": 3, "seed": 0, "weights": [0.9, 0.1], "data_order": DATA_ORDER_VERSION})
        check_data_order(_config(family), {"step": 3, "seed": 0, "weights": [1.0]})  # one dataset: unchanged
    decoder = dataclasses.replace(_config("decoder"), data=mixture)
    check_data_order(decoder, {"step": 3, "seed": 0, "weights": [0.9, 0.1]})  # the decoder's order did not change


MEMORY_MODELS = [
    ModelConfig(family="decoder", d_model=32, n_layers=3, n_heads=4, d_ff=64, position="relative"),
    ModelConfig(family="encoder", d_model=32, n_layers=2, n_heads=4, d_ff=64, position="learned",
                tie_embeddings=False),
    ModelConfig(family="encoder_decoder", d_model=32, n_layers=2, n_decoder_layers=5, n_heads=4, d_ff=64,
                position="relative"),
    ModelConfig(family="encoder_decoder", d_model=32, n_layers=2, n_decoder_layers=4, n_heads=4, d_ff=64,
                moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, every=2)),
    ModelConfig(family="decoder", d_model=32, n_layers=4, n_heads=4, d_ff=64,
                moe=MoEConfig(n_experts=4, top_k=1, every=2)),
]


@pytest.mark.parametrize("model", MEMORY_MODELS, ids=lambda m: f"{m.family}-{m.position}-moe{m.moe.n_experts}")
def test_memory_counts_every_parameter(model):
    """On one device, the weights memory.py counts are param_counts' total: both stacks of an
    encoder-decoder, relative-bias tables and experts included."""
    cfg = Config(model=model)
    assert param_elements_per_device(model, mesh_sizes(cfg, 1)) == param_counts(model)["params_total"]


@pytest.mark.parametrize("model", [
    ModelConfig(family="encoder_decoder", d_model=64, n_layers=2, n_decoder_layers=3, n_heads=4, d_ff=128,
                position="relative", max_seq_len=64),
    ModelConfig(family="decoder", d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64,
                moe=MoEConfig(n_experts=4, top_k=2, every=1)),
], ids=["encoder_decoder", "moe"])
def test_memory_of_weights_and_adam_matches_the_compiled_train_step(model):
    """Weights + Adam moments from memory.py agree within 2% with the arguments XLA's compiled
    train step holds (its memory analysis), less the batch."""
    cfg = Config(model=model, data=DataConfig(seq_len=32), optim=OptimConfig())
    mesh = make_mesh(MeshConfig())
    graphdef, abstract, optimizer = abstract_train_state(model, lambda p: make_optimizer(cfg.optim, 10, p), mesh)
    window = family_of(model).window_length(cfg)
    example = family_examples(PackedDataset(tokenize(["x" * 5000], TOKENIZER), window), cfg, TOKENIZER, 0)[0]
    batch = {k: jax.ShapeDtypeStruct((2, *v.shape), v.dtype, sharding=batch_sharding(mesh)) for k, v in example.items()}
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, 10), 1, False, model.moe)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=0).lower(abstract, batch).compile()
    batch_bytes = sum(2 * v.size * v.dtype.itemsize for v in example.values())
    compiled_bytes = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    estimate = memory_estimate(cfg)
    counted = estimate["memory_weights_bytes"] + estimate["memory_adam_bytes"]
    assert abs(counted - compiled_bytes) / compiled_bytes < 0.02
