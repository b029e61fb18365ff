"""The MoE evidence experiment: dense vs MoE at equal active parameters, and MoE without
the balancing loss. Trains the three runs (or reuses finished ones) and plots them.

    python bench/moe_evidence.py OUT_DIR [--steps 900] [--plot docs/img/moe_evidence.png]

Runs `lmjax train decoder_tiny`, `lmjax train moe_tiny` and `lmjax train moe_tiny --set
model.moe.load_balance_coef=0`, each for `--steps` steps (900: twice the default job's
tokens), into OUT_DIR/{dense,moe,moe_no_balance}, then prints one
JSON line (final validation loss of each; busiest expert's share of assignments over its
fair share 1/E, at the worst MoE layer, at the end and its maximum after step 50) and
saves validation-loss and load curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmjax.cli import main as lmjax  # noqa: E402
from lmjax.train.loggers import read_metrics, read_routing  # noqa: E402

RUNS = {
    "dense": ["decoder_tiny"],
    "moe": ["moe_tiny"],
    "moe_no_balance": ["moe_tiny", "--set", "model.moe.load_balance_coef=0"],
}


def train(out: Path, steps: int) -> None:
    for name, args in RUNS.items():
        run = out / name
        if (run / "sample.txt").exists():
            continue
        quiet = ["--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", f"train.run_dir={run}",
                 "--set", f"train.steps={steps}"]
        resume = ["--resume", str(run)] if (run / "config.json").exists() else []
        assert lmjax(["train", *args, *quiet, *resume]) == 0


def summarise(out: Path) -> dict:
    summary = {}
    for name in RUNS:
        val = [r for r in read_metrics(out / name) if "val_loss" in r]
        summary[name] = {"val_loss": round(val[-1]["val_loss"], 4), "val_bpb": round(val[-1]["val_bits_per_byte"], 4)}
        routing = read_routing(out / name)
        if routing:
            n_experts = routing["load"].shape[-1]
            worst = routing["load"].max(axis=(1, 2)) * n_experts  # (log steps,)
            later = routing["step"] > 50
            summary[name] |= {"max_load_final": round(float(worst[-1]), 2),
                              "max_load_peak_after_step_50": round(float(worst[later].max()), 2)}
    return summary


def plot(out: Path, path: Path) -> None:
    fig, (loss_ax, load_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in RUNS:
        val = [r for r in read_metrics(out / name) if "val_loss" in r]
        loss_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=name)
        routing = read_routing(out / name)
        if routing:
            load_ax.plot(routing["step"], routing["load"].max(axis=(1, 2)) * routing["load"].shape[-1], label=name)
    loss_ax.set(title="validation loss (nats/byte)", xlabel="step", ylim=(None, 2.6))
    load_ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
    load_ax.set(title="busiest expert / fair share (worst layer)", xlabel="step")
    loss_ax.legend(), load_ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--plot", type=Path, default=Path("docs/img/moe_evidence.png"))
    args = parser.parse_args()
    train(args.out, args.steps)
    print(json.dumps(summarise(args.out)))
    plot(args.out, args.plot)


if __name__ == "__main__":
    main()
