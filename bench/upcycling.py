"""Sparse upcycling at equal total FLOPs (docs/moe.md, "Sparse upcycling"; Komatsuzaki et al. 2022).

    python bench/upcycling.py OUT [--dense-steps 400] [--extra-steps 400] [--seeds 0,1,2] [--plot PNG] [--set K=V ...]

Per seed S (train.seed and data.seed: initialisation, batch order and validation split), in OUT/seedS/:
1. `dense`: `lmjax train upcycle_narrow` for --dense-steps steps (constant learning rate after
   warmup): C1 FLOPs.
2. `upcycled_init`: `lmjax upcycle dense` (8 experts of the full MLP width, top-2, routers seeded S).
3. Three arms, each to the same total C1 + C2 FLOPs, C2 = --extra-steps dense steps' FLOPs:
   - `dense_continued`: the dense weights trained on for C2 FLOPs (`--init-from dense`);
   - `upcycled`: the upcycled MoE trained for C2 FLOPs (`--init-from upcycled_init`), fewer
     steps than the dense arm since its steps cost more (two full-width experts per token);
   - `moe_scratch`: the same MoE from a fresh initialisation for C1 + C2 FLOPs.
   The two arms that start from `dense` get a fresh optimizer, a 20-step warmup and a cosine
   decay to 0.1x over their own steps; `moe_scratch` the experiment's 100-step warmup and the
   same cosine. All arms count budgets with `train.budget_flops` (lmjax.scaling.counting).
   The arms that start from `dense` restart the data order at step 0 (a new run), so they see
   phase 1's batches again; both see the same batches, so their comparison is like for like.

`--set` is passed to every `lmjax train` (e.g. a toy size for a check). Finished runs (loss.png
written) are reused and interrupted ones resumed. Prints one JSON line (final validation loss
per arm and seed, and their mean) and saves validation loss against total training FLOPs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmjax.cli import main as lmjax  # noqa: E402
from lmjax.config_parse import override  # noqa: E402
from lmjax.experiment import load_experiment  # noqa: E402
from lmjax.records import read_metrics  # noqa: E402
from lmjax.scaling.counting import run_flops_per_token, tokens_per_step  # noqa: E402

EXPERIMENT = "upcycle_narrow"
MOE = ["model.moe.n_experts=8", "model.moe.top_k=2"]
ARMS = ("dense_continued", "upcycled", "moe_scratch")


def step_flops(overrides: list[str]) -> float:
    """Training FLOPs of one step of the experiment with `overrides`."""
    cfg = override(load_experiment(EXPERIMENT), overrides)
    return run_flops_per_token(cfg) * tokens_per_step(cfg)


def train(run: Path, overrides: list[str], init_from: Path | None = None) -> None:
    """Train (or resume, or reuse) the run `run` of the experiment with `overrides`."""
    if (run / "loss.png").exists():
        return
    args = ["train", EXPERIMENT, *[a for o in overrides for a in ("--set", o)],
            "--set", f"train.run_dir={run}", "--set", "log.wandb=off", "--set", "log.progress_bar=false"]
    if (run / "config.json").exists():
        args += ["--resume", str(run)]
    elif init_from is not None:
        args += ["--init-from", str(init_from)]
    assert lmjax(args) == 0, f"lmjax {' '.join(args)} failed"


def run_seed(out: Path, seed: int, dense_steps: int, extra_steps: int, sets: list[str]) -> None:
    """Phase 1, the upcycling and the three arms of one seed (see the module docstring)."""
    seeded = [*sets, f"train.seed={seed}", f"data.seed={seed}"]
    c1, c2 = dense_steps * step_flops(sets), extra_steps * step_flops(sets)
    train(out / "dense", [*seeded, f"train.steps={dense_steps}"])
    if not (out / "upcycled_init").exists():
        upcycle = ["upcycle", str(out / "dense"), "--out", str(out / "upcycled_init"), "--seed", str(seed)]
        assert lmjax([*upcycle, *[a for o in MOE for a in ("--set", o)]]) == 0
    after_dense = ["optim.schedule=cosine", "optim.warmup_steps=20", f"train.budget_flops={c2}"]
    train(out / "dense_continued", [*seeded, *after_dense], init_from=out / "dense")
    train(out / "upcycled", [*seeded, *MOE, *after_dense], init_from=out / "upcycled_init")
    train(out / "moe_scratch", [*seeded, *MOE, "optim.schedule=cosine", f"train.budget_flops={c1 + c2}"])


def curves(out: Path, sets: list[str], dense_steps: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{run: (total training FLOPs at each evaluation, validation loss)} of one seed; the arms
    started from `dense` count its C1 FLOPs too and begin at its last evaluation."""
    dense_flops, moe_flops = step_flops(sets), step_flops([*sets, *MOE])
    c1 = dense_steps * dense_flops
    result = {}
    for name, per_step, offset in (("dense", dense_flops, 0.0), ("dense_continued", dense_flops, c1),
                                   ("upcycled", moe_flops, c1), ("moe_scratch", moe_flops, 0.0)):
        val = [(r["step"], r["val_loss"]) for r in read_metrics(out / name) if "val_loss" in r]
        if offset:
            val = [(0, result["dense"][1][-1]), *val]
        steps, losses = (np.array(v, dtype=float) for v in zip(*val))
        result[name] = (offset + steps * per_step, losses)
    return result


def plot(per_seed: list[dict], path: Path) -> None:
    """Validation loss against total training FLOPs, a thin line per seed and arm, and the arms'
    final losses minus the continued dense arm's, per seed."""
    fig, (loss_ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for colour, name in enumerate(("dense", *ARMS)):
        for i, seed_curves in enumerate(per_seed):
            flops, loss = seed_curves[name]
            loss_ax.plot(flops, loss, color=f"C{colour}", alpha=0.8, linewidth=1, label=name if i == 0 else None)
        if name in ARMS[1:]:
            gaps = [c[name][1][-1] - c["dense_continued"][1][-1] for c in per_seed]
            gap_ax.scatter([name] * len(gaps), gaps, color=f"C{colour}")
    loss_ax.set(title="validation loss (nats/byte)", xlabel="total training FLOPs", xscale="log")
    loss_ax.legend()
    gap_ax.axhline(0.0, color="C1", linewidth=0.8)
    gap_ax.set(title="final validation loss minus continued dense, per seed")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dense-steps", type=int, default=400)
    parser.add_argument("--extra-steps", type=int, default=400, help="C2 in dense steps")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/upcycling.png"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        run_seed(args.out / f"seed{seed}", seed, args.dense_steps, args.extra_steps, args.overrides)
        per_seed.append(curves(args.out / f"seed{seed}", args.overrides, args.dense_steps))
    final = {name: [round(float(c[name][1][-1]), 4) for c in per_seed] for name in ("dense", *ARMS)}
    print(json.dumps({"seeds": seeds, "final_val_loss": final,
                      "mean": {name: round(float(np.mean(v)), 4) for name, v in final.items()}}))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(per_seed, args.plot)


if __name__ == "__main__":
    main()
