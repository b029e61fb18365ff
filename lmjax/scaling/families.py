"""Parameter and training-FLOP counts of the encoder and encoder-decoder families (and the
relative position bias of any family), from a ModelConfig, without building the model.

Same conventions as `lmjax.scaling.counting` (2 FLOPs per multiply-add forward, 4 backward;
norms, softmax and the optimizer not counted; position tables, the relative bias included,
counted as embedding parameters), with each family's token counts:

- encoder (masked LM), T tokens: 6 * T * (N_matmul + D * V) + 12 * L * T^2 * D_attn per
  sequence: attention is bidirectional, so not halved as in the causal decoder.
- encoder-decoder, S encoder tokens and T decoder tokens per example: 6 * S * N_encoder +
  6 * T * (N_decoder except cross-attention keys/values + D * V) + 6 * S * N_cross_kv +
  12 * L_enc * S^2 * D_attn (bidirectional) + 6 * L_dec * T^2 * D_attn (causal) +
  12 * L_dec * T * S * D_attn (cross-attention sees all S). Per token: divided by S + T.
"""

from __future__ import annotations

from lmjax.config import ModelConfig


def _norm(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model


def _attention(cfg: ModelConfig) -> tuple[int, int]:
    """(query and output projections, key and value projections) of one attention."""
    d, h = cfg.d_model, cfg.head_dim
    return 2 * d * cfg.n_heads * h, 2 * d * cfg.kv_heads * h


def _feed_forward(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active per token) weights of block `layer`'s dense MLP or MoE."""
    per_mlp = lambda width: (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * width
    if not cfg.is_moe_layer(layer):
        return per_mlp(cfg.d_ff), per_mlp(cfg.d_ff)
    moe, expert = cfg.moe, per_mlp(cfg.expert_d_ff)
    router, shared = cfg.d_model * moe.n_experts, moe.n_shared_experts * expert
    return router + moe.n_experts * expert + shared, router + moe.top_k * expert + shared


def _stack(cfg: ModelConfig, n_layers: int, cross: bool) -> tuple[int, int]:
    """(total, active) weights of a stack of `n_layers` blocks (cross: with cross-attention)."""
    attention = sum(_attention(cfg)) + 2 * _norm(cfg)
    if cross:
        attention += sum(_attention(cfg)) + _norm(cfg)
    ffn = [_feed_forward(cfg, i) for i in range(n_layers)]
    return n_layers * attention + sum(t for t, _ in ffn), n_layers * attention + sum(a for _, a in ffn)


def _embedding(cfg: ModelConfig, n_relative_tables: int) -> int:
    d = cfg.d_model
    learned = cfg.max_seq_len * d if cfg.position == "learned" else 0
    relative = n_relative_tables * cfg.relative_buckets * cfg.n_heads if cfg.position == "relative" else 0
    return cfg.vocab_size * d + learned + relative


def family_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """params_total, params_active, params_embedding, params_output_head, params_nonembedding
    and params_active_nonembedding of the model of `cfg.family` (any family)."""
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    if cfg.family == "encoder_decoder":
        embedding = _embedding(cfg, 2)
        encoder, decoder = _stack(cfg, cfg.n_layers, False), _stack(cfg, cfg.decoder_layers, True)
        norms = 2 * _norm(cfg)  # encoder output norm, decoder final norm
        total, active = encoder[0] + decoder[0] + norms, encoder[1] + decoder[1] + norms
    else:
        embedding = _embedding(cfg, 1)
        total, active = (n + _norm(cfg) for n in _stack(cfg, cfg.n_layers, False))
    return {
        "params_total": embedding + head + total,
        "params_active": embedding + head + active,
        "params_embedding": embedding,
        "params_output_head": head,
        "params_nonembedding": total,
        "params_active_nonembedding": active,
    }


def family_train_flops_per_example(cfg: ModelConfig, encoder_len: int, decoder_len: int = 0) -> float:
    """Training FLOPs of one example (see the module docstring): an encoder sequence of
    `encoder_len` tokens, or an encoder-decoder pair of `encoder_len` inputs and
    `decoder_len` targets."""
    attention_width = cfg.n_heads * cfg.head_dim
    head = cfg.d_model * cfg.vocab_size
    if cfg.family == "encoder":
        active = family_param_counts(cfg)["params_active_nonembedding"]
        return 6.0 * encoder_len * (active + head) + 12.0 * cfg.n_layers * encoder_len**2 * attention_width
    s, t = encoder_len, decoder_len
    encoder = _stack(cfg, cfg.n_layers, False)[1] + _norm(cfg)
    cross_kv = cfg.decoder_layers * _attention(cfg)[1]
    decoder = _stack(cfg, cfg.decoder_layers, True)[1] + _norm(cfg) - cross_kv
    matmuls = 6.0 * (s * encoder + t * (decoder + head) + s * cross_kv)
    attention = 12 * cfg.n_layers * s * s + 6 * cfg.decoder_layers * t * t + 12 * cfg.decoder_layers * t * s
    return matmuls + attention * attention_width
