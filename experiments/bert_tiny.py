"""BERT's architecture at encoder_tiny's size, exportable to transformers' BertForMaskedLM.

As encoder_tiny (masked LM on the Python stdlib), with BERT's own choices where that
experiment takes lmjax's defaults: post-LayerNorm blocks and no final norm, a bias on every
projection, learned absolute positions, token-type embeddings, a LayerNorm over the input
embeddings, the exact (erf) GELU, and the MLM head's dense + GELU + LayerNorm transform with
an output bias. `lmjax convert to-hf RUN --out DIR` writes a checkpoint transformers loads.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    encoder = load_experiment("encoder_tiny")
    return dataclasses.replace(
        encoder, name="bert_tiny",
        model=dataclasses.replace(encoder.model, mlp="gelu_exact", d_ff=1024, norm="layernorm", norm_eps=1e-12,
                                  position="learned", norm_placement="post", bias=True, token_types=2,
                                  embed_norm=True, mlm_head_transform=True, tie_embeddings=True),
    )
