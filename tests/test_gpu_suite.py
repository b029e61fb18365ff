"""bench/gpu_suite.py --smoke: every row runs and is written, with grain and wandb unimportable
(the GPU image lacks them), on 2 CPU devices (so the rows that need several devices run too)."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]


# Rows the smoke test records as skipped: each runs the same suite code as a row that does run (the
# MoE row dropless ragged_dot, decode batch 4, compile at 2 layers); the MoE dispatches they select
# (grouped-matmul blocks, capacity) are checked against references in tests/test_moe.py.
SKIPPED = ["compile:1 layers", "decode:batch 1", "moe:dropless blocks", "moe:capacity auto"]


def test_gpu_suite_smoke_writes_every_row_without_grain_or_wandb(tmp_path):
    skips = [a for row in SKIPPED for a in ("--skip", row)]
    code = ("import runpy, sys; sys.modules['grain'] = None; sys.modules['wandb'] = None; "
            f"sys.argv = ['gpu_suite.py', '--smoke', '--out', {str(tmp_path)!r}, *{skips!r}]; "
            "runpy.run_path('bench/gpu_suite.py', run_name='__main__')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags(2)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {(r["section"], r["variant"]): r for r in report["rows"]}
    assert [s for s, _ in rows] == ["peak"] + ["compile"] * 2 + ["dense"] + ["decode"] * 2 + ["moe"] * 3 + [
        "dense"] * 3 + ["packing"] * 2 + ["long", "pipeline"]
    assert not [r for r in report["rows"] if "error" in r]
    assert [f"{s}:{v}" for (s, v), r in rows.items() if "skipped" in r] == SKIPPED
    rows = {key: row for key, row in rows.items() if "skipped" not in row}
    for (section, _), row in rows.items():
        if section in ("dense", "moe", "long", "pipeline"):  # random tokens: an untrained model's loss is ~ln(V)
            assert abs(row["loss"] - math.log(report["dense_config"]["vocab_size"])) < 0.2
            assert row["step_ms"] > 0 and 0 < row["mfu"] and 0 < row["fraction_of_matmul_peak"]
        if section == "moe":
            assert row["step_over_dense"] > 0 and row["params_active"] < row["params_total"]
        if section == "decode":
            assert 0 < row["fraction_of_measured_bound"] and row["kv_cache_read"].startswith("whole buffer")
    assert rows[("dense", "attention=dot_product")]["kernel"] == "xla"
    packing = rows[("packing", "decoder, attention=dot_product, float32")]
    assert packing["loss_max_abs_diff"] < 1e-5 and packing["grad_max_abs_diff_over_max"] < 1e-5
    assert rows[("dense", "attention=auto, bf16 params + fp32 master")]["param_dtype"] == "bfloat16"
    long = rows[("long", "seq 128, batch 1")]
    assert long["seq"] == 128 and long["context"] == 2 and long["xla_temp_bytes"] > 0
    pipeline = rows[("pipeline", "stages over every device")]  # 2 layers over the 2 devices, batch 2
    assert (pipeline["stages"], pipeline["data"], pipeline["microbatches"]) == (2, 1, 2)
    assert pipeline["bubble"] == pytest.approx(1 / 3) and pipeline["step_over_data_parallel"] > 0
    table = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"## {s}" in table for s in ("peak", "compile", "dense", "moe", "decode"))


def test_markdown_says_when_the_moe_rows_use_fewer_layers_and_which_rows_were_skipped():
    suite = runpy.run_path(str(REPO / "bench" / "gpu_suite.py"))
    report = {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "date": "2026-12-01", "xla_flags": "",
              "device_memory_bytes": 80e9, "dense_config": {"n_layers": 24}, "moe_layers": 12, "rows": [
                  {"section": "moe", "variant": "dropless ragged_dot", "layers": 12, "step_over_dense": 1.2},
                  {"section": "dense", "variant": "attention=einsum", "skipped": "skipped: 340 s > budget 330 s"}]}
    table = suite["markdown"](report)
    assert "| dropless ragged_dot | 12 | — | 1.2 |" in table
    assert "use 12 layers: the 24-layer MoE does not fit 80 GB" in table
    assert "| attention=einsum | skipped: 340 s > budget 330 s |" in table


def test_pipeline_row_layout_takes_the_most_stages_that_divide_devices_and_layers():
    layout = runpy.run_path(str(REPO / "bench" / "gpu_suite.py"))["pipeline_layout"]
    assert layout(8, 24, 8) == (8, 1, 8)  # 8 GPUs, 24 layers, batch 8: one sequence per microbatch
    assert layout(2, 24, 8) == (2, 1, 8) and layout(16, 24, 8) == (8, 2, 4)
    assert layout(5, 24, 8) == (1, 5, 1)  # no stage count divides both: the row is skipped
