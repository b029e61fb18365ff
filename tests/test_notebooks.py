"""Every notebook runs top to bottom against a tiny run the test trains itself."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lmjax.cli import main

# what each notebook prints once it has found its input (default: the run it inspects)
EXPECTED_OUTPUT = {"04_scaling_laws": "fitted exponents:"}
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["train", "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
            "--set", "model.d_ff=64", "--set", "model.max_seq_len=64",
            # MoE in the second layer (capacity routing), so every notebook meets both kinds of layer
            "--set", "model.moe.n_experts=4", "--set", "model.moe.every=2", "--set", "model.moe.dispatch=capacity", "--set", "data.seq_len=32",
            "--set", "data.max_bytes=200000", "--set", "train.batch_size=4", "--set", "train.steps=6",
            "--set", "train.eval_every=3", "--set", "train.log_every=2", "--set", "train.eval_batches=2", "--set", "train.sample_tokens=4",
            "--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", f"train.run_dir={runs / 'tiny'}"]
    assert main(args) == 0
    return runs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, runs, monkeypatch):
    assert not any(cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells), "commit notebooks cleared"
    monkeypatch.setenv("LMJAX_RUNS", str(runs))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(runs)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert EXPECTED_OUTPUT.get(path.stem, "newest run:") in outputs
