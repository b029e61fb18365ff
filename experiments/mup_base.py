"""The tuned µP base (issue #27, docs/scaling.md): the winner of `mup_base_search` at width 64
in mup_transfer's shape (2 layers, heads of width 32, d_ff 256, batch 8 x 64 bytes, 200 steps).

µP with base width 64 and Adam's epsilon scaled by width, so the settings transfer:

    lmjax train mup_base                                              # width 64
    lmjax train mup_base --set model.d_model=512 --set model.n_heads=16 --set model.d_ff=2048
    lmjax train mup_base --set model.parametrization=standard ...    # the standard model, same constants

(under the standard parametrization the epsilon stays `optim.eps` at every width). `WINNER`
holds the settings of the search's best run (r032 of 64, 2026-12-03): validation loss 2.323
against 2.518 for today's defaults at their best learning rate (r001), and the least of the
top three and r001 rerun on seeds 1 and 2 too (mean of 3 seeds 2.198; r009 2.258, r030 2.264,
r001 2.540). Against the defaults it raises the learning rate (9.9e-3), scales the
embedding's output up (3.3) and the logits and attention logits down (0.81, 0.56), initializes
the embedding and hidden matrices far smaller (std 0.0047, 0.0068) and an untied head larger
(0.093), with Adam's epsilon at 9.4e-9.
"""

from lmjax.config import Config
from lmjax.config_parse import override
from lmjax.experiment import load_experiment, load_experiment_module

WINNER_RUN = "r032-lr0.0099-lm0.81-em3.3-si0.0047-sh0.0068-so0.093-am0.56-eps9.4e-09-untied"  # in the search
WINNER = {"optim.lr": 0.0099, "model.logit_multiplier": 0.81, "model.embedding_multiplier": 3.3,
          "model.init_std_input": 0.0047, "model.init_std_hidden": 0.0068, "model.init_std_output": 0.093,
          "model.attention_multiplier": 0.56, "optim.eps": 9.4e-09, "model.tie_embeddings": False}
BASE_LR = WINNER["optim.lr"]


def config() -> Config:
    search, _ = load_experiment_module("mup_base_search", "experiments/mup_base_search.py is missing")
    settings = [f"{k}={str(v).lower()}" for k, v in WINNER.items()]
    return override(load_experiment("decoder_tiny"), [*search.COMMON, *settings, "name=mup_base"])
