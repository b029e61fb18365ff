"""Does width pay on the tuned µP base (issue #27, docs/scaling.md)? experiments/mup_base.py at
widths 64-512, 200 steps: µP at the base's learning rate against the standard model at the same
constants tuned per width (learning rates `BASE_LR` x 2^k, k = -4..0; at width 64 the two are
one model, tuned by the search). The first part of `mup_base_transfer` (see there for the
commands); 20 runs per seed.
"""

from lmjax.drivers.sweep import Sweep
from lmjax.experiment import load_experiment_module


def sweep():
    return Sweep("mup_base", tuple(load_experiment_module("mup_base_transfer", "experiments/mup_base_transfer.py "
                                                          "is missing")[0].widths_comparison()))
