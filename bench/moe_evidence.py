"""The MoE evidence experiment: dense vs MoE at equal active parameters, and MoE without
the balancing loss. Trains the three runs (or reuses finished ones) and plots them.

    python bench/moe_evidence.py OUT_DIR [--pair narrow|tiny] [--steps N] [--seed S] [--runs dense,moe] [--plot PNG]

`--pair narrow` (default): `decoder_narrow`, `moe_narrow` and `moe_narrow --set
model.moe.load_balance_coef=0` (0.85M active parameters, 3000 steps = 6.1M tokens each);
`--pair tiny`: the same three with `decoder_tiny` / `moe_tiny` (3.3M active parameters).
`--steps` replaces the experiments' own length; `--seed S` sets train.seed and data.seed (the
initialisation, the batch order and the validation split) for a replicate; `--runs` trains
and reports a subset. Runs go to OUT_DIR/{dense,moe,moe_no_balance};
an interrupted run resumes, a finished one (its loss.png written) is reused. Prints one JSON
line (each run's final validation loss; the busiest expert's share of assignments over its
fair share 1/E, at the worst MoE layer: in the last logged batch, its maximum over single
batches after step 50, and over all the batches logged in the last tenth of the run) and
saves validation-loss and load curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from moe_vs_dense import PAIRS  # noqa: E402  (bench/, the script's folder)

from lmjax.cli import main as lmjax  # noqa: E402
from lmjax.records import read_metrics, read_routing  # noqa: E402

RUNS = ("dense", "moe", "moe_no_balance")


def run_args(pair: str) -> dict[str, list[str]]:
    dense, moe = PAIRS[pair]
    return {"dense": [dense], "moe": [moe], "moe_no_balance": [moe, "--set", "model.moe.load_balance_coef=0"]}


def train(out: Path, pair: str, steps: int | None, seed: int, runs: list[str]) -> None:
    for name in runs:
        args, run = run_args(pair)[name], out / name
        if (run / "loss.png").exists():
            continue
        quiet = ["--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", f"train.run_dir={run}",
                 "--set", f"train.seed={seed}", "--set", f"data.seed={seed}"]
        if steps is not None:
            quiet += ["--set", f"train.steps={steps}"]
        resume = ["--resume", str(run)] if (run / "config.json").exists() else []
        assert lmjax(["train", *args, *quiet, *resume]) == 0


def summarise(out: Path, runs: list[str]) -> dict:
    summary = {}
    for name in runs:
        val = [r for r in read_metrics(out / name) if "val_loss" in r]
        summary[name] = {"val_loss": round(val[-1]["val_loss"], 4), "val_bpb": round(val[-1]["val_bits_per_byte"], 4)}
        routing = read_routing(out / name)
        if routing:
            n_experts = routing["load"].shape[-1]
            worst = routing["load"].max(axis=(1, 2)) * n_experts  # (log steps,)
            later, last_tenth = routing["step"] > 50, routing["step"] > 0.9 * routing["step"][-1]
            pooled = routing["load"][last_tenth].mean(axis=0).max() * n_experts  # shares over many batches
            summary[name] |= {"max_load_final": round(float(worst[-1]), 2),
                              "max_load_peak_after_step_50": round(float(worst[later].max()), 2),
                              "max_load_last_tenth_pooled": round(float(pooled), 2)}
    return summary


def plot(out: Path, runs: list[str], path: Path) -> None:
    """Validation loss, its difference to the dense run at each evaluation (when the dense run
    is among `runs`), and the worst layer's busiest-expert share over its fair share."""
    val = {name: {r["step"]: r["val_loss"] for r in read_metrics(out / name) if "val_loss" in r} for name in runs}
    fig, (loss_ax, gap_ax, load_ax) = plt.subplots(1, 3, figsize=(15, 3.5))
    for name in runs:
        colour = f"C{RUNS.index(name)}"
        steps = sorted(val[name])
        loss_ax.plot(steps, [val[name][s] for s in steps], marker="o", label=name, color=colour)
        if "dense" in val and name != "dense":
            shared = [s for s in steps if s in val["dense"]]
            gap_ax.plot(shared, [val[name][s] - val["dense"][s] for s in shared], marker="o", label=name, color=colour)
        routing = read_routing(out / name)
        if routing:
            worst = routing["load"].max(axis=(1, 2)) * routing["load"].shape[-1]
            load_ax.plot(routing["step"], worst, label=name, color=colour)
    loss_ax.set(title="validation loss (nats/byte)", xlabel="step", ylim=(None, 2.6))
    gap_ax.axhline(0.0, color="C0", linewidth=0.8)
    gap_ax.set(title="validation loss minus dense (nats/byte)", xlabel="step")
    load_ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
    load_ax.set(title="busiest expert / fair share (worst layer, one batch)", xlabel="step")
    for ax in (loss_ax, gap_ax, load_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="narrow")
    parser.add_argument("--steps", type=int, default=None, help="run length (default: the experiments' own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--plot", type=Path, default=None, help="default: docs/img/moe_evidence_PAIR.png")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if not set(runs) <= set(RUNS):
        parser.error(f"--runs takes names from {', '.join(RUNS)}")
    train(args.out, args.pair, args.steps, args.seed, runs)
    print(json.dumps(summarise(args.out, runs)))
    plot(args.out, runs, args.plot or Path(f"docs/img/moe_evidence_{args.pair}.png"))


if __name__ == "__main__":
    main()
