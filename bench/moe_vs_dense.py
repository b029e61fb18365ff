"""MoE decoder step time relative to the dense decoder with the same active parameters.

    python bench/moe_vs_dense.py [--rounds 3] [--steps 5] [--set ...]

Compares decoder_tiny (dense MLP, d_ff 704) with moe_tiny (8 experts of d_ff 352, top-2:
the same active parameters per token) in each dispatch mode / grouped-matmul kernel. The
runners take turns within one process, so all see the same machine state; the ratios
(median MoE step / median dense step) are what to compare across machines. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax

from train_step import StepRunner

VARIANTS = {
    "dense": ("decoder_tiny", []),
    "dropless-blocks": ("moe_tiny", ["model.moe.dispatch=dropless", "model.moe.grouped_matmul=blocks"]),
    "dropless-ragged_dot": ("moe_tiny", ["model.moe.dispatch=dropless", "model.moe.grouped_matmul=ragged_dot"]),
    "capacity-1.25": ("moe_tiny", ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.25"]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    runners = {name: StepRunner(exp, overrides + args.overrides) for name, (exp, overrides) in VARIANTS.items()}
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            times[name] += runner.step_times(args.steps)
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "overrides": args.overrides,
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        "ratio_to_dense": {k: round(v / step_ms["dense"], 2) for k, v in step_ms.items() if k != "dense"},
    }))


if __name__ == "__main__":
    main()
