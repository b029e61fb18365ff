"""BERT-style masked-LM encoder, decoder_tiny's shape, on the Python stdlib (~4 CPU minutes).

Bidirectional attention; 15% of the tokens selected, 80% of those masked, 10% replaced by a
random byte, 10% kept; the loss (and eval perplexity) covers the selected tokens only.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    decoder = load_experiment("decoder_tiny")
    return dataclasses.replace(
        decoder, name="encoder_tiny",
        model=dataclasses.replace(decoder.model, family="encoder"),
        data=dataclasses.replace(decoder.data, mlm_probability=0.15),
        train=dataclasses.replace(decoder.train, sample_tokens=0),  # an encoder does not generate
    )
