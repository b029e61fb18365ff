"""Probes of the tuned µP base, one constant at a time, at widths 64 and 256 (issue #27,
docs/scaling.md): why does µP on it trail the standard model with lmjax's defaults, tuned per
width, at width 256? experiments/mup_base.py under µP at the base's learning rate, with one
change each; the first two are what the wide default model does and µP does not
(bench/mup_update_sizes.py measured them):

- `sh`: the hidden matrices' init std (`model.init_std_hidden`, its value at the base width;
  µP scales it by 1 / sqrt(m)) at 1, 2, 4 and 8 times the winner's. The default model's hidden
  init grows with width, as an operator, by sqrt(m).
- `embed_lr`: the token embedding's effective learning rate at 1/2 and 1/4 of the base's,
  with the function at init unchanged: its stored init std times c and its output multiplier
  over c (c = 2, 4); Adam's update is the same size in stored units, so in the forward it is
  1/c. The default model's embedding updates shrink with width (its tuned learning rate does).

If the wider model wants the change and the base does not, the best value moves from width 64
to 256. And `tied`: the winner with its embedding table tied to the head (the table's init
and learning rate, the logits still times the logit multiplier / m), the effect of untying;
`lm` and `am`: the logit and attention multipliers at 1/2 and 2 times the winner's, which µP
keeps at every width.

    lmjax sweep mup_base_probes --dir DIR                 # seed 0; 22 runs
    lmjax sweep mup_base_probes --dir DIR_s1 --set train.seed=1 --set data.seed=1
"""

from lmjax.drivers.sweep import Sweep, SweepRun
from lmjax.experiment import load_experiment_module

WINNER = load_experiment_module("mup_base", "experiments/mup_base.py is missing")[0].WINNER
WIDTHS = [64, 256]
HIDDEN_STD_MULTIPLES = [1, 2, 4, 8]
EMBEDDING_LR_DIVISORS = [2, 4]
MULTIPLIER_FACTORS = [0.5, 2]


def widened(width: int, name: str, *overrides: str) -> SweepRun:
    return SweepRun(f"mup-w{width}-{name}", (f"model.d_model={width}", f"model.n_heads={width // 32}",
                                             f"model.d_ff={4 * width}", *overrides))


def sweep():
    std, std_in, em = (WINNER[f"model.{k}"] for k in ("init_std_hidden", "init_std_input", "embedding_multiplier"))
    hidden = [widened(w, f"sh{std * k:.3g}", f"model.init_std_hidden={std * k!r}")
              for w in WIDTHS for k in HIDDEN_STD_MULTIPLES]
    embedding = [widened(w, f"embed_lr{1 / c:g}", f"model.init_std_input={std_in * c!r}",
                         f"model.embedding_multiplier={em / c!r}") for w in WIDTHS for c in EMBEDDING_LR_DIVISORS]
    tied = [widened(w, "tied", "model.tie_embeddings=true") for w in WIDTHS]
    multipliers = [widened(w, f"{short}{value:.3g}", f"model.{name}={value!r}")
                   for short, name in (("lm", "logit_multiplier"), ("am", "attention_multiplier"))
                   for w in WIDTHS for value in (WINNER[f"model.{name}"] * f for f in MULTIPLIER_FACTORS)]
    return Sweep("mup_base", tuple(hidden + embedding + tied + multipliers))
