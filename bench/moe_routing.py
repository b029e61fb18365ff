"""Step time of MoE routing variants, as ratios within one process.

    python bench/moe_routing.py [--compare routing|granularity] [--rounds 3] [--steps 5] [--set ...]

- `routing`: expert choice (`model.moe.routing=experts_choose`: gathered rows, no one-hot)
  against token-choice capacity dispatch (the (B, T, E, C) one-hot einsums), both at capacity
  factor 1.25 on encoder_tiny with 8 experts of width 352, top-2 (moe_tiny's layer).
- `granularity`: moe_tiny's dropless step at G = 1, 2, 4, 8 (equal expert parameters and
  FLOPs; 8G experts of width 352 / G, 2G per token), with the default kernel for the backend.

The runners take turns within one process, so all see the same machine state; the ratios
(median step / the first variant's median step) are what to compare across machines. One
JSON line.
"""

from __future__ import annotations

import argparse
import json

import jax
from train_step import add_turn_arguments, median_step_ms_in_turns

ENCODER_MOE = ["model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.d_ff=352", "model.moe.dispatch=capacity",
               "model.moe.capacity_factor=1.25"]
COMPARISONS = {
    "routing": {
        "tokens_choose-capacity": ("encoder_tiny", [*ENCODER_MOE, "model.moe.routing=tokens_choose"]),
        "experts_choose": ("encoder_tiny", [*ENCODER_MOE, "model.moe.routing=experts_choose"]),
    },
    "granularity": {f"G{g}": ("moe_tiny", [f"model.moe.granularity={g}"]) for g in (1, 2, 4, 8)},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="routing")
    add_turn_arguments(parser)
    args = parser.parse_args()
    step_ms = median_step_ms_in_turns(COMPARISONS[args.compare], args.overrides, args.rounds, args.steps)
    first = next(iter(step_ms))
    print(json.dumps({
        "compare": args.compare, "device": jax.devices()[0].device_kind, "overrides": args.overrides,
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        f"ratio_to_{first}": {k: round(v / step_ms[first], 2) for k, v in step_ms.items() if k != first},
    }))


if __name__ == "__main__":
    main()
