"""The original T5's architecture at t5_tiny_span's size, exportable to transformers' T5ForConditionalGeneration.

As t5_tiny_span, but with T5's own choices where that experiment takes lmjax's defaults: a
ReLU feed-forward (not SwiGLU), attention logits not scaled by 1/sqrt(head width), RMSNorm
with epsilon 1e-6, and the tied output head reading the final hidden state times
d_model**-0.5. `lmjax convert to-hf RUN --out DIR` then writes a checkpoint transformers loads.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    span = load_experiment("t5_tiny_span")
    return dataclasses.replace(
        span, name="t5_tiny_hf",
        model=dataclasses.replace(span.model, mlp="relu", d_ff=1024, attention_scale=1.0, norm_eps=1e-6,
                                  tie_embeddings=True, tied_output_rescale=True),
    )
