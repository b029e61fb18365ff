"""PNG plots of scaling fits: IsoFLOP curves with their minima, the compute-optimal
frontier, and loss against N and D with the Approach 3 law."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_scaling_plots(data: dict, fitted: dict, out_dir: Path) -> list[Path]:
    """Write isoflop.png, frontier.png and loss_vs_n_d.png into `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    approach2, approach3 = fitted.get("approach2", {}), fitted.get("approach3", {})
    budgets = np.unique(data["C"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))

    fig, ax = plt.subplots(figsize=(6, 4))
    for color, c in zip(colors, budgets):
        at = data["C"] == c
        ax.scatter(data["N"][at], data["loss"][at], color=color, label=f"C = {c:.1e}")
        parabola = next((p for p in approach2.get("parabolas", []) if p["C"] == c), None)
        if parabola:
            n = np.geomspace(data["N"][at].min(), data["N"][at].max(), 100)
            ax.plot(n, np.polyval(parabola["coefficients"], np.log(n)), color=color)
    for minimum in approach2.get("minima", []):
        ax.axvline(minimum["N_opt"], color="grey", lw=0.5, ls=":")
    ax.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="loss", title="IsoFLOP curves")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    c = np.geomspace(budgets.min() / 3, budgets.max() * 3, 50)
    if "minima" in approach2:
        ax.scatter([m["C"] for m in approach2["minima"]], [m["N_opt"] for m in approach2["minima"]],
                   color="C0", label="IsoFLOP minima")
    for name, fit, color in (("Approach 2", approach2, "C0"), ("Approach 3", approach3, "C1")):
        if "n_opt" in fit:
            law = fit["n_opt"]
            ax.plot(c, law["coefficient"] * c ** law["exponent"], color=color,
                    label=f"{name}: N_opt ~ C^{law['exponent']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="C (training FLOPs)", ylabel="N_opt", title="Compute-optimal frontier")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "frontier.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("N", "D")):
        ax.scatter(data[key], data["loss"], c=np.log(data["C"]), cmap="viridis")
        ax.set(xscale="log", xlabel=key, ylabel="loss", title=f"loss vs {key} (colour: log C)")
    if "alpha" in approach3:
        predicted = approach3["E"] + approach3["A"] / data["N"] ** approach3["alpha"] + \
            approach3["B"] / data["D"] ** approach3["beta"]
        for ax, key in zip(axes, ("N", "D")):
            ax.scatter(data[key], predicted, marker="x", color="C3", label="Approach 3 fit")
            ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "loss_vs_n_d.png"))
    if "gamma" in fitted.get("granularity", {}):
        paths.append(_granularity_plot(data, fitted["granularity"], out_dir / "loss_vs_g.png"))
    return paths


def _size_groups(n: np.ndarray) -> np.ndarray:
    """A group index per run: sizes within 30% of the group's smallest are one size (at equal
    expert parameters N still grows a little with G, by the router)."""
    groups, group, start = np.empty(len(n), int), -1, -np.inf
    for i in np.argsort(n):
        if n[i] > 1.3 * start:
            group, start = group + 1, n[i]
        groups[i] = group
    return groups


def _granularity_plot(data: dict, law: dict, path: Path) -> Path:
    """Loss against G for each model size N and token count D (points), with the fitted law
    L(N, D, G) at that size and count (line)."""
    import matplotlib.pyplot as plt

    rows = np.isfinite(data["G"])
    n, d, g, loss = (data[k][rows] for k in ("N", "D", "G", "loss"))
    groups = _size_groups(n)
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, groups.max() + 1))
    grid = np.geomspace(g.min(), g.max(), 50)
    for group, color in enumerate(colors):
        for tokens in np.unique(d[groups == group]):
            at = (groups == group) & (d == tokens)
            size = float(np.median(n[at]))
            ax.scatter(g[at], loss[at], color=color)
            predicted = law["c"] + (law["g"] / grid ** law["gamma"] + law["a"]) / size ** law["alpha"] + \
                law["b"] / tokens ** law["beta"]
            ax.plot(grid, predicted, color=color, lw=1, label=f"N = {size:.3g}, D = {tokens:.3g}")
    ax.set(xscale="log", xlabel="granularity G", ylabel="loss", title="loss vs G (lines: granularity law)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
