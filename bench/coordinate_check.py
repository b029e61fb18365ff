"""The µP coordinate check's figure and slopes for docs/scaling.md (a few CPU minutes).

    python bench/coordinate_check.py docs/scaling
writes coordinate_check.png and coordinate_check.json (RMS and log-log slopes per step and layer).
"""

import json
import sys
from pathlib import Path

from lmjax.drivers.coordinate_check import WIDTHS, coordinate_check, plot_coordinate_check, width_slopes

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
results = {name: coordinate_check(name) for name in ("standard", "mup")}
plot_coordinate_check(results, out / "coordinate_check.png")
summary = {name: {"widths": list(WIDTHS), "outputs": ["block 1", "block 2", "logits"],
                  "rms": rms.round(4).tolist(), "slopes": width_slopes(rms).round(3).tolist()}
           for name, rms in results.items()}
(out / "coordinate_check.json").write_text(json.dumps(summary, indent=1) + "\n")
for name, rms in results.items():
    print(name, "slopes per step (block 1, block 2, logits):", width_slopes(rms).round(3).tolist())
