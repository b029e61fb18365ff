"""Learning-rate transfer across width, read from a sweep's results.csv (experiments/mup_transfer.py).

Runs are named `<parametrization>-w<width>-lr<learning rate>`; each results.csv is one seed
(a sweep run with `--set train.seed=S --set data.seed=S`). For each parametrization and width
the optimum is the learning rate of least validation loss averaged over the seeds, and one
figure per parametrization draws that mean loss against learning rate, a curve per width,
with each seed's losses as faint points. A further figure draws loss against width: each
parametrization tuned per width (its least loss over the learning rates) and, with `--at-lr`,
at that one learning rate (a µP base's tuned one: experiments/mup_base_transfer.py).

    python -m lmjax.scaling.transfer sweeps/mup_transfer/results.csv [more seeds' results.csv ...] \
        --out docs/scaling [--at-lr 0.002]
"""

from __future__ import annotations

import argparse
import csv
import math
import re
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


def mean_over_seeds(tables: list[dict]) -> dict:
    """The tables of `read_transfer_results`, one per seed, as one table of mean losses over
    the (parametrization, width, learning rate) points every seed has (widths with none left out)."""
    def losses(table, p, w):
        return dict(table.get(p, {}).get(w, []))

    mean: dict = {}
    for p, widths in tables[0].items():
        for w, runs in widths.items():
            common = [(lr, sum(losses(t, p, w)[lr] for t in tables) / len(tables))
                      for lr, _ in runs if all(lr in losses(t, p, w) for t in tables)]
            if common:
                mean.setdefault(p, {})[w] = common
    return mean


def grid_steps_moved(optima: dict[int, float]) -> int:
    """How many factor-of-2 grid steps separate the smallest and largest optimum over widths."""
    steps = [math.log2(lr) for lr in optima.values()]
    return round(max(steps) - min(steps))


def optimal_learning_rates(table: dict) -> dict:
    """{parametrization: {width: the learning rate of least loss}}."""
    return {p: {w: min(runs, key=lambda run: run[1])[0] for w, runs in widths.items()} for p, widths in table.items()}


def plot_learning_rate_transfer(table: dict, out_dir: Path, seeds: list[dict] = ()) -> list[Path]:
    """lr_transfer_<parametrization>.png in `out_dir`: `table`'s loss against learning rate,
    one curve per width, its optimum marked; each of the `seeds` tables' losses as faint points."""
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
            for seed in seeds:
                if seed.get(parametrization, {}).get(width):
                    ax.plot(*zip(*seed[parametrization][width]), ".", color=colour, alpha=0.35, markersize=4)
            lrs, losses = zip(*runs)
            ax.plot(lrs, losses, "-o", color=colour, markersize=3, label=f"width {width}")
            best = int(np.argmin(losses))
            ax.plot(lrs[best], losses[best], "*", color=colour, markersize=12)
        title = f"{parametrization}: loss against learning rate"
        if len(seeds) > 1:
            title += f" (mean of {len(seeds)} seeds)"
        ax.set(xscale="log", xlabel="learning rate (base)", ylabel="validation loss (nats/token)", title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"lr_transfer_{parametrization}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def loss_against_width(table: dict, at_lr: float | None = None) -> dict:
    """{curve: {width: loss}} from a `read_transfer_results` table: "<parametrization> tuned per
    width", the least loss over its learning rates (where some width has more than one), and
    with `at_lr` "<parametrization> at lr <at_lr>", the loss at that learning rate (within 1%,
    as run names round it) where run."""
    curves = {}
    for parametrization, widths in table.items():
        if any(len(runs) > 1 for runs in widths.values()):
            curves[f"{parametrization} tuned per width"] = {w: min(loss for _, loss in runs)
                                                           for w, runs in widths.items()}
        if at_lr is not None:
            fixed = {w: loss for w, runs in widths.items()
                     for lr, loss in runs if math.isclose(lr, at_lr, rel_tol=0.01)}
            if fixed:
                curves[f"{parametrization} at lr {at_lr:.3g}"] = fixed
    return curves


def plot_loss_against_width(curves: dict, out_dir: Path, seeds: list[dict] = ()) -> Path:
    """loss_against_width.png in `out_dir`: each of `curves` ({curve: {width: loss}}, e.g. the
    mean over seeds) against width, and each of the `seeds` curves' losses as faint points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, losses) in enumerate(curves.items()):
        colour = f"C{i}"
        for seed in seeds:
            if seed.get(name):
                ax.plot(*zip(*sorted(seed[name].items())), ".", color=colour, alpha=0.35, markersize=5)
        ax.plot(*zip(*sorted(losses.items())), "-o", color=colour, markersize=4, label=name)
    title = "loss against width" + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else "")
    ax.set(xscale="log", xlabel="width (d_model)", ylabel="validation loss (nats/token)", title=title)
    ax.set_xticks(sorted({w for losses in curves.values() for w in losses}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "loss_against_width.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_loss_against_width(mean: dict, seeds: list[dict]) -> None:
    """One line per curve and width: each seed's loss, then the mean's."""
    for name, losses in mean.items():
        for width, loss in sorted(losses.items()):
            each = ", ".join(f"{seed[name][width]:.4f}" if width in seed.get(name, {}) else "-" for seed in seeds)
            print(f"{name} w{width}: {each} -> mean {loss:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Learning-rate transfer figures and optima from sweep results.")
    parser.add_argument("results", nargs="+", type=Path, help="one results.csv per seed")
    parser.add_argument("--out", type=Path, required=True, help="directory for lr_transfer_<parametrization>.png")
    parser.add_argument("--at-lr", type=float, help="also draw each parametrization's loss against width at this "
                                                    "learning rate (a µP base's tuned one)")
    args = parser.parse_args()
    seeds = [read_transfer_results(path) for path in args.results]
    table = mean_over_seeds(seeds)
    for parametrization, widths in table.items():
        for i, seed in enumerate(seeds):
            optima = optimal_learning_rates(seed)[parametrization]
            print(f"{parametrization} {args.results[i]}: optimum per width",
                  ", ".join(f"{w}: {lr:.3g}" for w, lr in optima.items()))
        optima = optimal_learning_rates(table)[parametrization]
        best = {w: min(loss for _, loss in runs) for w, runs in widths.items()}
        print(f"{parametrization} mean of {len(seeds)}: optimum per width (loss)",
              ", ".join(f"{w}: {optima[w]:.3g} ({best[w]:.4f})" for w in optima),
              f"- moves {grid_steps_moved(optima)} grid steps")
    seed_curves = [loss_against_width(seed, args.at_lr) for seed in seeds]
    curves = loss_against_width(table, args.at_lr)
    print_loss_against_width(curves, seed_curves)
    paths = [*plot_learning_rate_transfer(table, args.out, seeds),
             plot_loss_against_width(curves, args.out, seed_curves)]
    print("wrote", ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
