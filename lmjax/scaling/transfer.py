"""Learning-rate transfer across width, read from a sweep's results.csv (experiments/mup_transfer.py).

Runs are named `<parametrization>-w<width>-lr<learning rate>`; for each parametrization and
width the optimum is the learning rate of least validation loss, and one figure per
parametrization draws loss against learning rate, a curve per width.

    python -m lmjax.scaling.transfer sweeps/mup_transfer/results.csv docs/scaling
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

NAME = re.compile(r"(?P<parametrization>\w+)-w(?P<width>\d+)-lr(?P<lr>[0-9.e+-]+)$")


def read_transfer_results(results_csv: Path, loss_column: str = "val_loss") -> dict:
    """{parametrization: {width: [(lr, loss), ...] sorted by lr}} of the finished runs."""
    table: dict = {}
    with Path(results_csv).open() as f:
        for row in csv.DictReader(f):
            match = NAME.match(row["name"])
            if match:
                runs = table.setdefault(match["parametrization"], {}).setdefault(int(match["width"]), [])
                runs.append((float(match["lr"]), float(row[loss_column])))
    return {p: {w: sorted(runs) for w, runs in sorted(widths.items())} for p, widths in table.items()}


def optimal_learning_rates(table: dict) -> dict:
    """{parametrization: {width: the learning rate of least loss}}."""
    return {p: {w: min(runs, key=lambda run: run[1])[0] for w, runs in widths.items()} for p, widths in table.items()}


def plot_learning_rate_transfer(table: dict, out_dir: Path) -> list[Path]:
    """lr_transfer_<parametrization>.png in `out_dir`: loss against learning rate, one curve
    per width, its optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for parametrization, widths in table.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
        for colour, (width, runs) in zip(colours, widths.items()):
            lrs, losses = zip(*runs)
            ax.plot(lrs, losses, "-o", color=colour, markersize=3, label=f"width {width}")
            best = int(np.argmin(losses))
            ax.plot(lrs[best], losses[best], "*", color=colour, markersize=12)
        ax.set(xscale="log", xlabel="learning rate (base)", ylabel="validation loss (nats/token)",
               title=f"{parametrization}: loss against learning rate")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"lr_transfer_{parametrization}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    transfer = read_transfer_results(results)
    for parametrization, optima in optimal_learning_rates(transfer).items():
        print(parametrization, "optimum per width:", ", ".join(f"{w}: {lr:.3g}" for w, lr in optima.items()))
    print("wrote", ", ".join(map(str, plot_learning_rate_transfer(transfer, out))))
