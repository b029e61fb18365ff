"""int8 post-training weight quantization with qwix: error bound, perplexity, bytes, CLI."""

import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from safetensors.numpy import load_file

import lmjax
from lmjax.cli import main
from lmjax.lora import path_name
from lmjax.quantize import QUANTIZED_FILE, groups
from lmjax.train.loop import train
from lmjax.train.run_eval import evaluate_run, restore_weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained float run and its int8 quantization (per channel), written by the CLI."""
    root = tmp_path_factory.mktemp("quant")
    cfg = tiny_config(root / "float", steps=30, eval_every=100, eval_batches=2, sample_tokens=0, checkpoint_every=100)
    train(cfg, root / "float")
    assert main(["quantize", str(root / "float"), "--out", str(root / "int8")]) == 0
    return root


def test_each_matmul_stays_within_the_rounding_bound(runs):
    """|x W_q - x W| <= sum_i |x_i| max_i |W_ij| / 254 for every output j (half a quantization
    step of the column's absmax scale), at every layer; vectors are stored exactly."""
    _, _, before, _, _ = restore_weights(runs / "float")
    _, _, after, _, _ = restore_weights(runs / "int8")
    after = dict(nnx.to_flat_state(after))
    matrices = 0
    for path, weight in nnx.to_flat_state(before):
        w, q = np.asarray(weight[...], np.float64), np.asarray(after[path][...], np.float64)
        channelwise = groups(weight, "channel")
        if channelwise is None:
            np.testing.assert_array_equal(q, w)
            continue
        matrices += 1
        reduced = tuple(a for a in range(w.ndim) if a not in channelwise)
        w2, q2 = (np.moveaxis(a, reduced, range(len(reduced))).reshape(int(np.prod([w.shape[r] for r in reduced])), -1)
                  for a in (w, q))  # (reduced, channels)
        x = np.random.default_rng(0).normal(size=(7, w2.shape[0]))
        bound = np.abs(x) @ np.abs(w2).max(axis=0, keepdims=True).repeat(w2.shape[0], 0) / 254
        assert np.all(np.abs(x @ q2 - x @ w2) <= bound + 1e-9), path_name(path)
        assert not np.array_equal(q, w)
    assert matrices >= 8


def test_validation_perplexity_rises_less_than_two_percent(runs):
    base, quantized = evaluate_run(runs / "float"), evaluate_run(runs / "int8")
    assert quantized["perplexity"] != base["perplexity"]
    assert quantized["perplexity"] < 1.02 * base["perplexity"]


def test_saved_weights_are_a_quarter_of_float32(runs):
    """The int8 values are exactly 1/4 of the matrices' float32 bytes; the scales add one
    float32 per output unit (here per 32 or more weights: at most 1/32 more, shrinking as
    1/width); vectors stay float32. This tiny model (d_model 32) saves 28% of its float32 bytes."""
    saved = load_file(str(runs / "int8" / QUANTIZED_FILE))
    _, _, params, _, _ = restore_weights(runs / "float")
    matrix_bytes = sum(np.asarray(v[...]).nbytes for _, v in nnx.to_flat_state(params) if groups(v, "channel"))
    vector_bytes = sum(np.asarray(v[...]).nbytes for _, v in nnx.to_flat_state(params) if not groups(v, "channel"))
    values = sum(a.nbytes for k, a in saved.items() if k.endswith(".qvalue"))
    scales = sum(a.nbytes for k, a in saved.items() if k.endswith(".scale"))
    assert all(a.dtype == np.int8 for k, a in saved.items() if k.endswith(".qvalue"))
    assert 4 * values == matrix_bytes and 0 < 32 * scales <= matrix_bytes
    assert sum(a.nbytes for a in saved.values()) == values + scales + vector_bytes


def test_load_generate_and_eval_accept_a_quantized_run(runs, capsys):
    model, cfg, _ = lmjax.load(runs / "int8")
    assert cfg.quant.weights == "int8" and cfg.quant.granularity == "channel"
    assert main(["generate", str(runs / "int8"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert "saved in int8" in capsys.readouterr().err
    assert main(["eval", str(runs / "int8"), "--max-batches", "1", "--json"]) == 0


@pytest.mark.parametrize("args, message", [
    (["quantize", "{int8}", "--out", "{tmp}/again"], "already quantized"),
    (["quantize", "{float}", "--out", "{tmp}/four", "--bits", "4"], "int8 weights only"),
    (["train", "--set", "quant.weights=int8", "--set", "train.run_dir={tmp}/qat"], "QAT"),
])
def test_bad_input_is_one_clear_line(runs, capsys, tmp_path, args, message):
    args = [a.format(int8=runs / "int8", float=runs / "float", tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())
