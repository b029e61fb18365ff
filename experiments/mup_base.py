"""The tuned µP base (issue #27, docs/scaling.md): the winner of `mup_base_search` at width 64
in mup_transfer's shape (2 layers, heads of width 32, d_ff 256, batch 8 x 64 bytes, 200 steps).

µP with base width 64 and Adam's epsilon scaled by width, so the settings transfer:

    lmjax train mup_base                                              # width 64
    lmjax train mup_base --set model.d_model=512 --set model.n_heads=16 --set model.d_ff=2048
    lmjax train mup_base --set model.parametrization=standard ...    # the standard model, same constants

(under the standard parametrization the epsilon stays `optim.eps` at every width). `WINNER`
holds the search's settings: PLACEHOLDER until the search has run, today's defaults at lr 2e-3
(the search's first anchor).
"""

from lmjax.config import Config
from lmjax.config_parse import override
from lmjax.experiment import load_experiment, load_experiment_module

WINNER_RUN = "r000-lr0.002"  # its name in the search
WINNER = {"optim.lr": 2e-3}
BASE_LR = WINNER["optim.lr"]


def config() -> Config:
    search, _ = load_experiment_module("mup_base_search", "experiments/mup_base_search.py is missing")
    settings = [f"{k}={str(v).lower()}" for k, v in WINNER.items()]
    return override(load_experiment("decoder_tiny"), [*search.COMMON, *settings, "name=mup_base"])
