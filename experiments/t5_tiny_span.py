"""T5-style encoder-decoder with span corruption on the Python stdlib (~4 CPU minutes).

2 encoder + 2 decoder blocks of decoder_tiny's width, T5 relative position bias, shared tied
embeddings. Inputs of 128 tokens: 141 raw tokens, 15% noise in spans of mean length 3, each
replaced by a sentinel; targets of 29 tokens list each span after its sentinel. After
training, `lmjax generate RUN --prompt "def f(<extra_id_0>):" --temperature 0` fills spans in.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    decoder = load_experiment("decoder_tiny")
    return dataclasses.replace(
        decoder, name="t5_tiny_span",
        model=dataclasses.replace(decoder.model, family="encoder_decoder", n_layers=2, n_decoder_layers=2,
                                  position="relative", relative_buckets=32, relative_max_distance=128),
        data=dataclasses.replace(decoder.data, seq_len=128, noise_density=0.15, mean_noise_span_length=3.0),
        train=dataclasses.replace(decoder.train, sample_tokens=64),
    )
