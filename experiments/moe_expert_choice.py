"""Experiment 6(d) of docs/moe.md: expert choice against token choice on encoder_tiny's masked LM.

encoder_tiny's objective (bidirectional attention, 15% of the bytes selected, the loss on those
only) on moe_narrow's shape: d_model 128, 4 layers, 8 experts of width 176 in every layer, k = 2,
Switch loss 0.01, z-loss 1e-3. Both arms use capacity dispatch with capacity factor 1.25 in
training and evaluation, so each expert has the same C = 1.25 * 2 * 128 / 8 = 40 slots per
sequence and both arms compute the same expert FLOPs:

- `tokens`: token choice, every token's top 2 experts; assignments past an expert's C are dropped;
- `experts`: expert choice (Zhou et al. 2022), every expert takes its top C tokens of the sequence;
  a token may be taken by several experts or by none.

400 steps of 16 x 128 bytes; seeds change the initialisation (`train.seed`), the data order and
validation split are the same in every run, so runs of one seed compare pairwise. Smaller than
encoder_tiny (d_model 256) so that all 6 runs take about 20 minutes of an idle 2-core CPU:

    lmjax sweep moe_expert_choice --dir DIR           # the runs, resumably (DIR/<arm>-s<seed>/)
    python experiments/moe_expert_choice.py DIR [--out FIGURE.png]   # final losses, dropped/unrouted, figure
"""

import argparse
import dataclasses
from pathlib import Path

from lmjax.config import Config
from lmjax.drivers.sweep import Sweep, SweepRun
from lmjax.experiment import load_experiment

ARMS = {"tokens": ["model.moe.routing=tokens_choose"], "experts": ["model.moe.routing=experts_choose"]}
SEEDS = (0, 1, 2)


def config() -> Config:
    narrow, encoder = load_experiment("moe_narrow"), load_experiment("encoder_tiny")
    moe = dataclasses.replace(narrow.model.moe, dispatch="capacity", capacity_factor=1.25, eval_capacity_factor=1.25)
    train = dataclasses.replace(narrow.train, steps=400, batch_size=16, eval_every=100, eval_batches=16, log_every=10,
                                checkpoint_every=200, sample_tokens=0)
    return dataclasses.replace(narrow, name="moe_expert_choice", train=train, data=encoder.data,
                               model=dataclasses.replace(narrow.model, family=encoder.model.family, moe=moe))


def sweep() -> Sweep:
    runs = [SweepRun(f"{arm}-s{seed}", (*sets, f"train.seed={seed}")) for arm, sets in ARMS.items() for seed in SEEDS]
    return Sweep("moe_expert_choice", tuple(runs), ("log.wandb=off", "log.progress_bar=false"))


def _late_mean(records: list[dict], key: str, last: int = 100) -> float:
    """Mean of training metric `key` over the last `last` steps of one run (nan if not logged)."""
    import numpy as np

    rows = [(r["step"], r[key]) for r in records if key in r and "val_loss" not in r]
    end = rows[-1][0] if rows else 0
    return float(np.mean([v for s, v in rows if s > end - last])) if rows else float("nan")


def summarize(sweep_dir: Path, out: Path) -> None:
    """Print per arm each seed's final validation loss and, over the last 100 steps, the shares of
    assignments dropped (token choice) and of tokens no expert serves (`moe_unrouted`) and MaxVio, and
    draw validation loss over training (each seed) and the unrouted share into `out`."""
    import matplotlib.pyplot as plt
    import numpy as np

    from lmjax.records import read_metrics

    fig, (losses, unrouted) = plt.subplots(1, 2, figsize=(10, 3.6), layout="tight")
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange")):
        runs = [read_metrics(sweep_dir / f"{arm}-s{seed}") for seed in SEEDS
                if (sweep_dir / f"{arm}-s{seed}" / "metrics.jsonl").is_file()]
        finals = []
        for i, records in enumerate(runs):
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            if val:
                losses.plot(*zip(*val), color=colour, marker=".", label=arm if i == 0 else None)
                finals.append(val[-1][1])
            train = [(r["step"], r["moe_unrouted"]) for r in records if "moe_unrouted" in r and "val_loss" not in r]
            if train:
                unrouted.plot(*zip(*train), color=colour, alpha=0.7, label=arm if i == 0 else None)
        late = {key: ", ".join(f"{_late_mean(r, 'moe_' + key):.3f}" for r in runs)
                for key in ("dropped", "unrouted", "max_violation")}
        print(f"{arm:8s} seeds {len(runs)}  val loss {np.mean(finals) if finals else float('nan'):.4f} "
              f"({', '.join(f'{v:.4f}' for v in finals)})  last 100 steps, each seed: "
              + "  ".join(f"{key} {values}" for key, values in late.items()))
    losses.set(title="validation loss (nats per masked byte)", xlabel="step")
    unrouted.set(title="share of tokens no routed expert serves", xlabel="step")
    for panel in (losses, unrouted):
        panel.legend()
    fig.savefig(out, dpi=80)
    print("figure:", out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="summarize and plot a moe_expert_choice sweep")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/moe_expert_choice.png"))
    summarize(**vars(parser.parse_args()))
