"""Learning-rate transfer on the tuned µP base (issue #27, docs/scaling.md): experiments/mup_base.py
at widths 64-512 (heads of width 32, d_ff = 4 x width), under µP and the standard
parametrization at the same constants, at learning rates a factor of 2 apart around the base's
tuned one, `BASE_LR` x 2^k: k = -4..0 for the standard model above width 64 (its optimum falls
with width; at 64 it is µP's base, whose learning rate the search tuned: k = 0 only), -3..+1 for
µP. Runs are named like mup_transfer's (`mup-w512-lr0.0031`), so `python -m
lmjax.scaling.transfer` reads them.

Its first part is `mup_base_widths` (every standard run, and µP at the base's learning rate
only; 20 runs): run that first, then this one in the same directory, which skips what is
finished (16 more runs).

    lmjax sweep mup_base_widths --dir DIR                               # seed 0
    lmjax sweep mup_base_transfer --dir DIR                             # the rest of µP's grid
    # more seeds: --dir DIR_s1 --set train.seed=1 --set data.seed=1
    python -m lmjax.scaling.transfer DIR/results.csv DIR_s1/results.csv ... --at-lr BASE_LR --out docs/scaling
"""

from lmjax.drivers.sweep import Sweep, SweepRun
from lmjax.experiment import load_experiment_module

BASE_LR = load_experiment_module("mup_base", "experiments/mup_base.py is missing")[0].BASE_LR
WIDTHS = [64, 128, 256, 512]
STANDARD_STEPS = range(-4, 1)  # learning rates BASE_LR x 2^k above the base width
MUP_STEPS = range(-3, 2)


def run(parametrization: str, width: int, lr: float) -> SweepRun:
    """mup_base at `width` under `parametrization` and learning rate `lr`."""
    return SweepRun(f"{parametrization}-w{width}-lr{lr:.3g}",
                    (f"model.parametrization={parametrization}", f"model.d_model={width}",
                     f"model.n_heads={width // 32}", f"model.d_ff={4 * width}", f"optim.lr={lr!r}"))


def widths_comparison() -> list[SweepRun]:
    """Per width: the standard model at every learning rate of its grid, then µP at BASE_LR."""
    return [run(p, width, BASE_LR * 2.0**k) for width in WIDTHS for p in ("standard", "mup")
            for k in (STANDARD_STEPS if p == "standard" and width > WIDTHS[0] else [0])]


def sweep():
    first = widths_comparison()
    rest = [run("mup", width, BASE_LR * 2.0**k) for width in WIDTHS for k in MUP_STEPS if k != 0]
    return Sweep("mup_base", tuple(first + rest))
