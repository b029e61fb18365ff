"""Parameter and FLOP counts computed from a ModelConfig, without building the model.

Conventions (also in docs/scaling.md):
- `params_total` counts every stored weight, tied embeddings once.
- `params_embedding` counts the token embedding table and learned position table; an
  untied output head is counted with the non-embedding parameters, as Kaplan et al. do
  not, so we report it separately as `params_output_head`.
- `params_active` counts the weights one token uses: a MoE layer contributes its router,
  `top_k` routed experts and the shared experts, not all `n_experts` (dense models:
  active == total).
- Training FLOPs per token = 6 * (N_active_nonembedding + D * V) + 6 * L * T * D_attn:
  2 FLOPs per multiply-add forward and 4 backward (Kaplan et al. 2020, sec. 2.1; Hoffmann
  et al. 2022, app. F), for every matmul weight a token passes through (the output
  projection D x V included, tied or not), plus attention scores and weighted values
  (2 matmuls of T x D_attn per token and layer, forward 4 * T * D_attn) halved for causal
  masking (6 * L * T * D_attn, not 12). Norms, softmax and the optimizer are not counted.
  This is the MFU numerator; recomputation from remat is not counted (MFU, not HFU).
- Forward FLOPs per token (inference, scoring a full context) are a third of that:
  2 * (N_active_nonembedding + D * V) + 2 * L * T * D_attn.

The counts are per family; the decoder is `decoder_param_counts`; the encoder and
encoder-decoder families (and the relative position bias of any family) are counted in
`lmjax.scaling.families`, to which `param_counts` and `train_flops_per_token` branch.
"""

from __future__ import annotations

from lmjax.config import Config, ModelConfig
from lmjax.scaling.families import family_param_counts, family_train_flops_per_example

PETAFLOP_DAY = 1e15 * 24 * 3600  # FLOPs in one petaFLOP/s-day


def norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model


def attention_params(cfg: ModelConfig) -> int:
    """wq, wo (d_model x n_heads*head_dim) and wk, wv (d_model x kv_heads*head_dim)."""
    d, h = cfg.d_model, cfg.head_dim
    return d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2


def mlp_params(cfg: ModelConfig, d_ff: int) -> int:
    """One feed-forward of hidden width `d_ff`: SwiGLU has 3 matrices, GELU 2."""
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * d_ff


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) weights of one MoE feed-forward: router (d_model x
    n_experts, no bias), `n_experts` routed experts and `n_shared_experts` shared ones,
    each an MLP of width `expert_d_ff`; a token uses the router, `top_k` routed and all
    shared experts."""
    moe = cfg.moe
    router = cfg.d_model * moe.n_experts
    expert = mlp_params(cfg, cfg.expert_d_ff)
    shared = moe.n_shared_experts * expert
    return router + moe.n_experts * expert + shared, router + moe.top_k * expert + shared


def params_per_layer(cfg: ModelConfig, layer: int = 0) -> tuple[int, int]:
    """(total, active per token) weights of block `layer`: attention, feed-forward (dense
    MLP or MoE) and two norms."""
    fixed = attention_params(cfg) + 2 * norm_params(cfg)
    if cfg.is_moe_layer(layer):
        total, active = moe_params(cfg)
    else:
        total = active = mlp_params(cfg, cfg.d_ff)
    return fixed + total, fixed + active


def decoder_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a DecoderLM built from `cfg` (see the module docstring)."""
    d = cfg.d_model
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
    output_head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    per_layer = [params_per_layer(cfg, i) for i in range(cfg.n_layers)]
    layers_total = sum(total for total, _ in per_layer) + norm_params(cfg)  # + final norm
    layers_active = sum(active for _, active in per_layer) + norm_params(cfg)
    return {
        "params_total": embedding + output_head + layers_total,
        "params_active": embedding + output_head + layers_active,
        "params_embedding": embedding,
        "params_output_head": output_head,
        "params_nonembedding": layers_total,
        "params_active_nonembedding": layers_active,
    }


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes: params_total, params_active,
    params_embedding, params_output_head, params_nonembedding, params_active_nonembedding."""
    if cfg.family != "decoder" or cfg.position == "relative":
        return family_param_counts(cfg)
    return decoder_param_counts(cfg)


def _matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights one token multiplies by: active non-embedding plus the D x V output head."""
    return param_counts(cfg)["params_active_nonembedding"] + cfg.d_model * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward-only model FLOPs per token of a causal context of `seq_len` tokens:
    2 * N_matmul + 2 * L * T * n_heads * head_dim (see the module docstring)."""
    attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 2.0 * _matmul_params_per_token(cfg) + attention


def example_lengths(cfg: Config) -> tuple[int, int]:
    """(encoder or decoder tokens, decoder target tokens) of one training example of the run:
    (seq_len, 0) for the decoder and encoder, (inputs, targets) lengths for span corruption."""
    if cfg.model.family != "encoder_decoder":
        return cfg.data.seq_len, 0
    from lmjax.objectives import span_corruption_lengths

    return cfg.data.seq_len, span_corruption_lengths(cfg.data.seq_len, cfg.data.noise_density,
                                                     cfg.data.mean_noise_span_length)[1]


def train_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int = 0) -> float:
    """Model FLOPs to train on one token at context `seq_len`: 3x the forward pass,
    6 * N_matmul + 6 * L * T * n_heads * head_dim (see the module docstring). Encoder and
    encoder-decoder: `lmjax.scaling.families`, for an encoder-decoder averaged over the
    `seq_len` input and `decoder_len` target tokens of one example."""
    if cfg.family != "decoder":
        return family_train_flops_per_example(cfg, seq_len, decoder_len) / (seq_len + decoder_len)
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def to_petaflop_days(flops: float) -> float:
    """FLOPs -> petaFLOP/s-days (1 PF-day = 8.64e19 FLOPs)."""
    return flops / PETAFLOP_DAY
