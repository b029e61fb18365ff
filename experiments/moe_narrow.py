"""decoder_narrow with 8-expert top-2 MoE layers of the same active width (2.5M parameters in all).

Each expert is half as wide as decoder_narrow's MLP (176 vs 352 hidden units), so a token's
two experts use as many parameters as the dense MLP: the same active parameters and tokens,
about 3x the total parameters. The MoE half of the evidence in docs/moe.md; about 24 minutes
on a 2-core CPU.
"""

import dataclasses

from lmjax.config import Config, MoEConfig
from lmjax.experiment import load_experiment


def config() -> Config:
    dense = load_experiment("decoder_narrow")
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=176, dispatch="dropless", load_balance_coef=0.01, z_loss_coef=1e-3)
    return dataclasses.replace(dense, name="moe_narrow", model=dataclasses.replace(dense.model, moe=moe))
