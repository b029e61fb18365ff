"""Mixtral-8x7B's published shape (Jiang et al. 2024): 46.7B weights, 12.9B active per token.

llama2_7b's block with grouped-query attention (8 kv heads), SwiGLU experts of d_ff 14336,
8 experts per layer with top-2 routing, context 4096 (of its 32k) and vocabulary 32000.
For `lmjax plan mixtral_8x7b`; the training settings are llama2_7b's (Mixtral's are unpublished).
"""

import dataclasses

from lmjax.config import Config, MoEConfig
from lmjax.experiment import load_experiment


def config() -> Config:
    llama = load_experiment("llama2_7b")
    model = dataclasses.replace(llama.model, n_kv_heads=8, d_ff=14336, moe=MoEConfig(n_experts=8, top_k=2))
    return dataclasses.replace(llama, name="mixtral_8x7b", model=model)
