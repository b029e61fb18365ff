"""The default decoder with 8-expert top-2 MoE layers of the same active width.

Each expert is half as wide as decoder_tiny's MLP (352 vs 704 hidden units), so a token's
two experts use as many parameters as the dense MLP: same active parameters and tokens as
`decoder_tiny`, about 3x the total parameters. Compare with
`lmjax train decoder_tiny` and with the balancing loss off:
`lmjax train moe_tiny --set model.moe.load_balance_coef=0` (docs/moe.md).
"""

import dataclasses

from lmjax.config import Config, MoEConfig
from lmjax.experiment import load_experiment


def config() -> Config:
    dense = load_experiment("decoder_tiny")
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=352, dispatch="dropless", load_balance_coef=0.01, z_loss_coef=1e-3)
    return dataclasses.replace(dense, name="moe_tiny", model=dataclasses.replace(dense.model, moe=moe))
