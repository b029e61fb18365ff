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
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
