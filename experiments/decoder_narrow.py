"""decoder_tiny at d_model 128 for 3000 steps: a 0.85M-parameter decoder trained on 6.1M tokens.

The dense half of the MoE evidence (docs/moe.md): at ~7 tokens per parameter the model's size,
not the tokens it has seen, limits its loss, which is where experts should help. About 17
minutes on a 2-core CPU. Its MoE counterpart with the same active parameters: `moe_narrow`.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    tiny = load_experiment("decoder_tiny")
    return dataclasses.replace(
        tiny, name="decoder_narrow",
        model=dataclasses.replace(tiny.model, d_model=128, d_ff=352),
        train=dataclasses.replace(tiny.train, steps=3000, eval_every=250, eval_batches=32, checkpoint_every=1000),
    )
