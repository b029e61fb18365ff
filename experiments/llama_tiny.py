"""decoder_tiny with LLaMA's own settings: untied head, RMSNorm epsilon 1e-6; exports to LlamaForCausalLM.

(decoder_tiny exports too, as a Llama with a tied head.) `lmjax convert to-hf RUN --out DIR`.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    decoder = load_experiment("decoder_tiny")
    return dataclasses.replace(decoder, name="llama_tiny",
                               model=dataclasses.replace(decoder.model, tie_embeddings=False, norm_eps=1e-6))
