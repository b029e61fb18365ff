"""The cost of auxiliary-loss-free balancing on moe_tiny's training step.

    python bench/moe_bias.py [--rounds 3] [--steps 5] [--set section.field=value ...]

Three compiled steps of the same model take turns within one process, so all see the same
machine state: `off` (softmax router, no bias: today's default), `bias` (softmax router whose
selection bias moves every step, bias_update_rate 1e-3) and `sigmoid-bias` (DeepSeek-V3: sigmoid
scores plus the moving bias). Reported: the median step of each and its ratio to `off` (the
issue's expectation: at most 1.02). One JSON line. On a machine shared with other jobs only the
ratios mean anything, and only roughly.
"""

from __future__ import annotations

import argparse
import json

import jax
from train_step import add_turn_arguments, median_step_ms_in_turns

VARIANTS = {
    "off": [],
    "bias": ["model.moe.bias_update_rate=1e-3"],
    "sigmoid-bias": ["model.moe.router=sigmoid", "model.moe.bias_update_rate=1e-3"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_turn_arguments(parser)
    args = parser.parse_args()
    variants = {name: ("moe_tiny", sets) for name, sets in VARIANTS.items()}
    step_ms = median_step_ms_in_turns(variants, args.overrides, args.rounds, args.steps)
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "overrides": args.overrides,
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        "ratio_to_off": {k: round(v / step_ms["off"], 3) for k, v in step_ms.items() if k != "off"},
    }))


if __name__ == "__main__":
    main()
