"""Experiment 6(a) of docs/moe.md: how MoE routing is balanced. `moe_narrow` (8 experts, top-2, a
sigmoid router, no z-loss) at 500 steps of 16 x 64 bytes, in five arms x three seeds:

- `none`: no balancing at all;
- `switch`: the Switch balancing loss, coefficient 0.01;
- `bias-1e-4`, `bias-1e-3`, `bias-1e-2`: auxiliary-loss-free balancing (Wang et al. 2024), the
  selection bias moved by u = 1e-4, 1e-3, 1e-2 per step, no balancing loss.

Seeds change the initialisation (`train.seed`); data order and validation split are the same in
every run, so every run's validation loss compares with every other's. All 15 runs take about 35
minutes of an idle 2-core CPU:

    lmjax sweep moe_balance --dir DIR           # the runs, resumably (DIR/<arm>-s<seed>/)
    python experiments/moe_balance.py DIR [--out FIGURE.png]   # MaxVio curves, final losses, the figure
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from lmjax.config import Config
from lmjax.drivers.sweep import Sweep, SweepRun
from lmjax.experiment import load_experiment

ARMS = {
    "none": ["model.moe.load_balance_coef=0"],
    "switch": ["model.moe.load_balance_coef=0.01"],
    **{f"bias-{u}": ["model.moe.load_balance_coef=0", f"model.moe.bias_update_rate={u}"]
       for u in ("1e-4", "1e-3", "1e-2")},
}
SEEDS = (0, 1, 2)


def config() -> Config:
    narrow = load_experiment("moe_narrow")
    moe = dataclasses.replace(narrow.model.moe, router="sigmoid", z_loss_coef=0.0)
    data = dataclasses.replace(narrow.data, seq_len=64)
    train = dataclasses.replace(narrow.train, steps=500, batch_size=16, eval_every=250, eval_batches=8, log_every=10,
                                checkpoint_every=250, sample_tokens=0)
    return dataclasses.replace(narrow, name="moe_balance", model=dataclasses.replace(narrow.model, moe=moe),
                               data=data, train=train)


def sweep() -> Sweep:
    runs = [SweepRun(f"{arm}-s{seed}", (*sets, f"train.seed={seed}")) for arm, sets in ARMS.items() for seed in SEEDS]
    return Sweep("moe_balance", tuple(runs), ("log.wandb=off", "log.progress_bar=false"))


def summarize(sweep_dir: Path, out: Path) -> None:
    """Print per arm the mean MaxVio (over MoE layers) over steps 51-100 (how fast it balances)
    and over the last 100 steps (mean, each seed, and its standard deviation over those steps:
    how much it oscillates), and the final validation loss (mean and each seed), and draw MaxVio
    over training (mean over MoE layers, seeds averaged) and the final validation losses into `out`."""
    import matplotlib.pyplot as plt
    import numpy as np

    from lmjax.records import read_metrics

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(ARMS):
        records = [read_metrics(sweep_dir / f"{arm}-s{seed}") for seed in SEEDS
                   if (sweep_dir / f"{arm}-s{seed}" / "metrics.jsonl").is_file()]
        if not records:
            continue
        train = [[r for r in rs if "moe_max_violation" in r] for rs in records]
        length = min(len(t) for t in train)
        steps = np.array([r["step"] for r in train[0][:length]])
        violation = np.array([[r["moe_max_violation"] for r in t[:length]] for t in train])  # (seeds, logs)
        val = [[r["val_loss"] for r in rs if "val_loss" in r][-1:] for rs in records]
        val = [v[0] for v in val if v]
        curves.plot(steps, violation.mean(axis=0), label=arm)
        finals.scatter([i] * len(val), val, label=arm)
        late = violation[:, steps > steps[-1] - 100]  # (seeds, logs of the last 100 steps)
        early = violation[:, (steps > 50) & (steps <= 100)].mean()
        print(f"{arm:10s} seeds {len(records)}  MaxVio steps 51-100 {early:.3f}, last 100 steps {late.mean():.3f} "
              f"({', '.join(f'{v:.3f}' for v in late.mean(axis=1))}; std over steps {late.std(axis=1).mean():.3f})  "
              f"val loss {np.mean(val) if val else float('nan'):.4f}  ({', '.join(f'{v:.4f}' for v in val)})")
    curves.set(title="MaxVio = E max(load) - 1, mean over MoE layers and seeds", xlabel="step", yscale="log")
    curves.legend()
    finals.set(title="final validation loss (nats/byte), each seed", xticks=range(len(ARMS)),
               xticklabels=list(ARMS))
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"figure: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="summarize and plot a moe_balance sweep")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/moe_balance.png"))
    args = parser.parse_args(sys.argv[1:])
    summarize(args.sweep_dir, args.out)
