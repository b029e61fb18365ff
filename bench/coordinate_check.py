"""The µP coordinate check's figure and slopes for docs/scaling.md (a few CPU minutes).

    python bench/coordinate_check.py docs/scaling
writes coordinate_check.png and coordinate_check.json (RMS and log-log slopes per step and layer).

    python bench/coordinate_check.py --constants
prints, without writing anything, the check with every base constant away from its default
(OFF_DEFAULT_CONSTANTS and OFF_DEFAULT_EPS, as tests/test_mup.py runs it; µP's epsilon scaled,
and unscaled): each output's width exponent
and per-step slopes, and each parameter's update slope per step, for both parametrizations.
"""

import json
import sys
from pathlib import Path

import numpy as np

from lmjax.drivers.coordinate_check import (
    OFF_DEFAULT_CONSTANTS,
    OFF_DEFAULT_EPS,
    WIDTHS,
    coordinate_check,
    coordinate_data,
    plot_coordinate_check,
    width_exponents,
    width_slopes,
)


def print_with_constants() -> None:
    for name, extra in (("mup", {"mup_scale_adam_eps": True}), ("mup, epsilon unscaled", {}), ("standard", {})):
        parametrization = name.split(",")[0]
        rms, updates = coordinate_data(parametrization, eps=OFF_DEFAULT_EPS, **OFF_DEFAULT_CONSTANTS, **extra)
        print(f"{name}: exponents (block 1, block 2, logits)", width_exponents(rms).round(3).tolist())
        print("  slopes per step:", width_slopes(rms).round(3).tolist())
        for parameter, moved in updates.items():
            print(f"  update slope of {parameter} per step:", np.round(width_slopes(moved), 3).tolist())


if sys.argv[1:] == ["--constants"]:
    print_with_constants()
    sys.exit()
out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
results = {name: coordinate_check(name) for name in ("standard", "mup")}
plot_coordinate_check(results, out / "coordinate_check.png")
summary = {name: {"widths": list(WIDTHS), "outputs": ["block 1", "block 2", "logits"],
                  "rms": rms.round(4).tolist(), "slopes": width_slopes(rms).round(3).tolist()}
           for name, rms in results.items()}
(out / "coordinate_check.json").write_text(json.dumps(summary, indent=1) + "\n")
for name, rms in results.items():
    print(name, "slopes per step (block 1, block 2, logits):", width_slopes(rms).round(3).tolist())
