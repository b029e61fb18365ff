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
"""

from __future__ import annotations

from lmjax.config import ModelConfig


def params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block: attention projections, MLP and two norms."""
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2  # wq, wo; wk, wv
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    norms = 2 * (2 * d if cfg.norm == "layernorm" else d)
    return attention + mlp + norms


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a DecoderLM built from `cfg`."""
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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token at context `seq_len` (see module docstring)."""
    matmul_params = param_counts(cfg)["params_nonembedding"] + cfg.d_model * cfg.vocab_size
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * matmul_params + attention
