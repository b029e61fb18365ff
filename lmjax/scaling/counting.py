"""Parameter and FLOP counts computed from a ModelConfig, without building the model.

Conventions (also in docs/benchmarks.md):
- `params_total` counts every stored weight, tied embeddings once.
- `params_embedding` counts the token embedding table and learned position table; an
  untied output head is counted with the non-embedding parameters, as Kaplan et al. do
  not, so we report it separately as `params_output_head`.
- Training FLOPs per token = 6 * (N_nonembedding + D * V) + 6 * L * T * D_attn:
  2 FLOPs per multiply-add forward and 4 backward, for every matmul weight (the output
  projection D x V included, tied or not), plus attention scores and weighted values
  (2 matmuls of T x D_attn per token and layer, forward 4 * T * D_attn) halved for causal
  masking (6 * L * T * D_attn, not 12). Norms, softmax and the optimizer are not counted.
  This is the MFU numerator; recomputation from remat is not counted (MFU, not HFU).

The encoder and encoder-decoder families (and relative position biases) are counted in
`lmjax.scaling.families`; `param_counts` and `train_flops_per_token` branch to it.
"""

from __future__ import annotations

from lmjax.config import Config, ModelConfig
from lmjax.scaling.families import family_param_counts, family_train_flops_per_example


def params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block: attention projections, MLP and two norms."""
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2  # wq, wo; wk, wv
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    norms = 2 * (2 * d if cfg.norm == "layernorm" else d)
    return attention + mlp + norms


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes (any family)."""
    if cfg.family != "decoder" or cfg.position == "relative":
        return family_param_counts(cfg)
    d = cfg.d_model
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
    output_head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    final_norm = 2 * d if cfg.norm == "layernorm" else d
    layers = cfg.n_layers * params_per_layer(cfg)
    return {
        "params_total": embedding + output_head + layers + final_norm,
        "params_embedding": embedding,
        "params_output_head": output_head,
        "params_nonembedding": layers + final_norm,
    }


def example_lengths(cfg: Config) -> tuple[int, int]:
    """(encoder or decoder tokens, decoder target tokens) of one training example of the run:
    (seq_len, 0) for the decoder and encoder, (inputs, targets) lengths for span corruption."""
    if cfg.model.family != "encoder_decoder":
        return cfg.data.seq_len, 0
    from lmjax.objectives import span_corruption_lengths

    return cfg.data.seq_len, span_corruption_lengths(cfg.data.seq_len, cfg.data.noise_density,
                                                     cfg.data.mean_noise_span_length)[1]


def train_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int = 0) -> float:
    """Model FLOPs to train on one token at context `seq_len` (see module docstring); for an
    encoder-decoder, averaged over the `seq_len` input and `decoder_len` target tokens of one
    example."""
    if cfg.family != "decoder":
        return family_train_flops_per_example(cfg, seq_len, decoder_len) / (seq_len + decoder_len)
    matmul_params = param_counts(cfg)["params_nonembedding"] + cfg.d_model * cfg.vocab_size
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * matmul_params + attention
