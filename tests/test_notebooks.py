"""Every notebook runs top to bottom against a tiny run the test trains itself, and shows
its figures and the numbers it is for."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lmjax.cli import main

# per notebook: a number it must print (a regex over its text output; {loss} is the tiny run's
# validation loss, computed here independently) and how many figures it draws
EXPECTED = {
    "01_inspect_checkpoint": (r"step 6: loss {loss}, perplexity \d+\.\d\d, bits/byte \d\.\d{{3}}", 1),
    "02_moe_routing": (r"busiest expert / fair share at the last log step, per MoE layer: \[[1-4]\.\d*\s*\]\n"
                       r"(.|\n)*MaxVio at the last log step, per MoE layer: \[[0-3]\.\d*\s*\] mean [0-3]\.\d*\n"
                       r"(.|\n)*experts used per MoE layer for this text: \[[1-4]\]", 4),
    "03_attention_maps": (r"\(2, 2, 32, 32\)", 1),  # layers, heads, and the 32 bytes of its text
    # the committed micro-sweep's fits (docs/scaling.md)
    "04_scaling_laws": (r"fitted exponents: a = 0\.645 \(Approach 2\), 0\.467 \(Approach 3\)", 1),
}
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["train", "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
            "--set", "model.d_ff=64", "--set", "model.max_seq_len=64",
            # MoE in the second layer (capacity routing, a sigmoid router with a moving bias), so every notebook
            # meets both kinds of layer
            "--set", "model.moe.n_experts=4", "--set", "model.moe.every=2", "--set", "model.moe.dispatch=capacity",
            "--set", "model.moe.router=sigmoid", "--set", "model.moe.bias_update_rate=0.01",
            "--set", "data.seq_len=32", "--set", "data.max_bytes=200000", "--set", "train.batch_size=4",
            "--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "train.log_every=2",
            "--set", "train.eval_batches=2", "--set", "train.sample_tokens=4",
            "--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", f"train.run_dir={runs / 'tiny'}"]
    assert main(args) == 0
    return runs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, runs, monkeypatch):
    assert not any(cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells), "commit notebooks cleared"
    monkeypatch.setenv("LMJAX_RUNS", str(runs))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures become outputs
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(runs)}}).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    pattern, figures = EXPECTED[path.stem]
    if "{loss}" in pattern:
        from lmjax.runs import evaluate_run

        pattern = pattern.format(loss=re.escape(f"{evaluate_run(runs / 'tiny', max_batches=4)['loss']:.3f}"))
    assert re.search(pattern, text), text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == figures
