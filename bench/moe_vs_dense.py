"""MoE decoder step time relative to the dense decoder with the same active parameters.

    python bench/moe_vs_dense.py [--pair tiny|narrow] [--rounds 3] [--steps 5] [--set ...]

Compares decoder_tiny (dense MLP, d_ff 704) with moe_tiny (8 experts of d_ff 352, top-2:
the same active parameters per token), or with `--pair narrow` decoder_narrow with
moe_narrow (d_model 128), in each dispatch mode / grouped-matmul kernel. The
runners take turns within one process, so all see the same machine state; the ratios
(median MoE step / median dense step) are what to compare across machines. One JSON line.
"""

from __future__ import annotations

import argparse
import json

import jax
from train_step import add_turn_arguments, median_step_ms_in_turns

PAIRS = {"tiny": ("decoder_tiny", "moe_tiny"), "narrow": ("decoder_narrow", "moe_narrow")}
MOE_VARIANTS = {
    "dropless-blocks": ["model.moe.dispatch=dropless", "model.moe.grouped_matmul=blocks"],
    "dropless-ragged_dot": ["model.moe.dispatch=dropless", "model.moe.grouped_matmul=ragged_dot"],
    "capacity-1.25": ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.25"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    add_turn_arguments(parser)
    args = parser.parse_args()
    dense, moe = PAIRS[args.pair]
    variants = {"dense": (dense, []), **{name: (moe, sets) for name, sets in MOE_VARIANTS.items()}}
    step_ms = median_step_ms_in_turns(variants, args.overrides, args.rounds, args.steps)
    print(json.dumps({
        "pair": args.pair, "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
        "overrides": args.overrides,
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        "ratio_to_dense": {k: round(v / step_ms["dense"], 2) for k, v in step_ms.items() if k != "dense"},
    }))


if __name__ == "__main__":
    main()
