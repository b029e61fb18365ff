"""Packed documents equal each document alone (bench/packing.py): per-token losses and gradients
within 1e-5, for every family and every attention kernel that runs on CPU. (cuDNN, on a GPU:
bench/gpu_suite.py's packing row.)"""

import runpy
from pathlib import Path

import pytest

PACKING = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "packing.py"))


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_packed_documents_equal_each_document_alone(family, attention):
    """Three documents in one row (segment ids 1, 2, 3, positions restarting; an encoder-decoder
    packs inputs and targets) against each in its own right-padded row. The decoder's first
    layer attends through a sliding window of 3 positions (narrower than every document), its
    second over the whole context."""
    window = dict(sliding_window=3, n_layers=2, global_every=2) if family == "decoder" else {}
    result = PACKING["packed_minus_alone"](PACKING["packing_config"](family, attention, **window))
    assert result["tokens"] == (9 if family == "encoder_decoder" else 16)
    assert result["mean_loss"] > 3  # an untrained model over 64 ids: about ln 64
    assert result["loss_max_abs_diff"] < 1e-5, result
    assert result["grad_max_abs_diff_over_max"] < 1e-5, result
