"""Both new families train through the ordinary loop, dense and with 4 experts top-2; eval
and generate work on their runs from the CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lmjax.cli import main
from lmjax.config import MoEConfig
from lmjax.records import read_metrics
from lmjax.train.loop import train


def family_config(tiny, family: str, experts: int):
    sample_tokens = 16 if (family, experts) == ("encoder_decoder", 0) else 0  # only the CLI check reads a sample
    cfg = tiny(steps=20, eval_every=20, eval_batches=1, log_every=1, checkpoint_every=20, sample_tokens=sample_tokens)
    moe = MoEConfig(n_experts=experts, top_k=2, d_ff=32, dispatch="capacity") if experts else MoEConfig()
    model = dataclasses.replace(cfg.model, family=family, moe=moe, scan_layers=False,
                                n_decoder_layers=1 if family == "encoder_decoder" else None)
    data = dataclasses.replace(cfg.data, seq_len=32 if family == "encoder" else 48)
    return dataclasses.replace(cfg, model=model, data=data, optim=dataclasses.replace(cfg.optim, lr=1e-2))


@pytest.mark.parametrize("family, experts", [("encoder", 0), ("encoder", 4), ("encoder_decoder", 0),
                                             ("encoder_decoder", 4)])
def test_family_trains(tiny, capsys, family, experts):
    cfg = family_config(tiny, family, experts)
    summary = train(cfg, cfg.train.run_dir)
    records = read_metrics(cfg.train.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert summary["finished"] and np.isfinite(summary["val_loss"])
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3])  # from ~ln(384) = 5.95 towards byte statistics
    assert records[-2]["mfu"] > 0 and records[-2]["tokens_per_second"] > 0
    if experts:
        assert "moe_load_balance_loss" in records[-2]
    elif family == "encoder_decoder":  # one run serves the CLI checks too
        check_encoder_decoder_cli(cfg, capsys)


def check_encoder_decoder_cli(cfg, capsys):
    """`lmjax eval` and `lmjax generate` (span infilling) on a finished encoder-decoder run."""
    sample = (Path(cfg.train.run_dir) / "sample.txt").read_text()
    assert sample.startswith("input:") and "<extra_id_0>" in sample
    capsys.readouterr()
    assert main(["eval", cfg.train.run_dir, "--json", "--max-batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and np.isclose(result["perplexity"], np.exp(result["loss"]))
    # targets per example: 48 inputs -> 53 raw, round(7.95) = 8 noise tokens in 3 spans -> 8 + 3 + 1 = 12
    assert result["tokens"] == 12 * cfg.train.batch_size
    assert main(["generate", cfg.train.run_dir, "--prompt", "def f(<extra_id_0>):\n    return<extra_id_1>",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("targets: ") and out[1].startswith("filled:  def f(")
    assert "<extra_id" not in out[1]
