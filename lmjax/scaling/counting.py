"""Parameter and FLOP counts computed from a ModelConfig, without building the model.

Every family is counted the same way, from the block stacks its spec lists
(`lmjax.families.Family.stacks`): embeddings, one final norm (and relative-bias table)
per stack, each stack's blocks, the output head.

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
  masking (6 * L * T * D_attn, not 12); a sliding-window layer (W < T) attends to at most W keys
  per query, 12 * (W - W^2 / 2T) * D_attn per token. Norms, softmax and the optimizer are not
  counted.
  This is the MFU numerator; recomputation from remat is not counted (MFU, not HFU).
- Forward FLOPs per token (inference, scoring a full context) are a third of that:
  2 * (N_active_nonembedding + D * V) + 2 * L * T * D_attn.

Encoder and encoder-decoder training FLOPs (position tables, the relative bias included,
are counted as embedding parameters):
- encoder (masked LM), T tokens: 6 * T * (N_matmul + D * V) + 12 * L * T^2 * D_attn per
  sequence: attention is bidirectional, so not halved as in the causal decoder.
- encoder-decoder, S encoder tokens and T decoder tokens per example: 6 * S * N_encoder +
  6 * T * (N_decoder except cross-attention keys/values + D * V) + 6 * S * N_cross_kv +
  12 * L_enc * S^2 * D_attn (bidirectional) + 6 * L_dec * T^2 * D_attn (causal) +
  12 * L_dec * T * S * D_attn (cross-attention sees all S). Per token: divided by S + T.
"""

from __future__ import annotations

import math

from lmjax.config import Config, ConfigError, ModelConfig
from lmjax.families import family_of

PETAFLOP_DAY = 1e15 * 24 * 3600  # FLOPs in one petaFLOP/s-day


def norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model


def kv_params(cfg: ModelConfig) -> int:
    """wk, wv of one attention: d_model x kv_heads*head_dim each."""
    return 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim


def attention_params(cfg: ModelConfig) -> int:
    """wq, wo (d_model x n_heads*head_dim) and wk, wv (d_model x kv_heads*head_dim), and
    with `bias` their biases."""
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    biases = q_width + 2 * kv_width + cfg.d_model if cfg.bias else 0
    return 2 * cfg.d_model * q_width + kv_params(cfg) + biases


def mlp_params(cfg: ModelConfig, d_ff: int) -> int:
    """One feed-forward of hidden width `d_ff`: gated (swiglu, geglu) 3 matrices, else 2; and
    with `bias` their biases."""
    matrices = 3 if cfg.gated_mlp else 2
    biases = (matrices - 1) * d_ff + cfg.d_model if cfg.bias else 0
    return matrices * cfg.d_model * d_ff + biases


def router_params(cfg: ModelConfig) -> int:
    """The router of one MoE layer: d_model x (granularity * n_experts), no bias."""
    return cfg.d_model * cfg.moe.n_routed_experts


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) weights of one MoE feed-forward: the router, G * n_experts
    routed experts, each an MLP of width `expert_d_ff` = d_ff / G, and the shared experts (one
    MLP of width `shared_d_ff`); a token uses the router, G * top_k routed and all shared
    experts. Expert weights do not depend on the granularity G; the router grows with it."""
    moe = cfg.moe
    router = router_params(cfg)
    expert = mlp_params(cfg, cfg.expert_d_ff)
    shared = mlp_params(cfg, cfg.shared_d_ff) if moe.n_shared_experts else 0
    return (router + moe.n_routed_experts * expert + shared,
            router + moe.experts_per_token * expert + shared)


def params_per_layer(cfg: ModelConfig, layer: int = 0, cross: bool = False) -> tuple[int, int]:
    """(total, active per token) weights of block `layer`: attention, feed-forward (dense
    MLP or MoE) and two norms; with `cross`, also a cross-attention and its norm."""
    fixed = attention_params(cfg) + 2 * norm_params(cfg)
    if cross:
        fixed += attention_params(cfg) + norm_params(cfg)
    if cfg.is_moe_layer(layer):
        total, active = moe_params(cfg)
    else:
        total = active = mlp_params(cfg, cfg.d_ff)
    return fixed + total, fixed + active


def stack_params(cfg: ModelConfig, n_layers: int, cross: bool = False) -> tuple[int, int]:
    """(total, active) weights of `n_layers` blocks and the stack's final norm (none after
    post-norm blocks)."""
    per_layer = [params_per_layer(cfg, i, cross) for i in range(n_layers)]
    final = norm_params(cfg) if cfg.norm_placement == "pre" else 0
    return sum(t for t, _ in per_layer) + final, sum(a for _, a in per_layer) + final


def relative_bias_params(cfg: ModelConfig) -> int:
    """The relative-bias tables: (relative_buckets, n_heads) per stack, with position=relative."""
    tables = len(family_of(cfg).stacks(cfg))
    return tables * cfg.relative_buckets * cfg.n_heads if cfg.position == "relative" else 0


def embedding_params(cfg: ModelConfig) -> int:
    """Token table, learned position table, one relative-bias table per stack, token-type
    table and the norm over the input embeddings."""
    learned = cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
    extras = cfg.token_types * cfg.d_model + (norm_params(cfg) if cfg.embed_norm else 0)
    return cfg.vocab_size * cfg.d_model + learned + relative_bias_params(cfg) + extras


def head_transform_params(cfg: ModelConfig) -> int:
    """BERT's MLM head transform (dense d_model x d_model and bias, norm) and output bias."""
    return cfg.d_model * cfg.d_model + cfg.d_model + norm_params(cfg) + cfg.vocab_size if cfg.mlm_head_transform else 0


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes (any family): params_total,
    params_active, params_embedding, params_output_head, params_nonembedding,
    params_active_nonembedding."""
    embedding = embedding_params(cfg)
    output_head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    stacks = [stack_params(cfg, stack.n_layers, stack.cross) for stack in family_of(cfg).stacks(cfg)]
    total = sum(t for t, _ in stacks) + head_transform_params(cfg)
    active = sum(a for _, a in stacks) + head_transform_params(cfg)
    return {
        "params_total": embedding + output_head + total,
        "params_active": embedding + output_head + active,
        "params_embedding": embedding,
        "params_output_head": output_head,
        "params_nonembedding": total,
        "params_active_nonembedding": active,
    }


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int = 0) -> float:
    """Forward-only model FLOPs per token, a third of `train_flops_per_token`: for a decoder
    over a causal context of `seq_len` tokens, 2 * N_matmul + 2 * L * T * n_heads * head_dim
    (see the module docstring)."""
    return train_flops_per_example(cfg, seq_len, decoder_len) / (3 * (seq_len + decoder_len))


def example_lengths(cfg: Config) -> tuple[int, int]:
    """(encoder or decoder tokens, decoder target tokens) of one training example of the run:
    (seq_len, 0) for the decoder and encoder, (inputs, targets) lengths for span corruption."""
    return family_of(cfg.model).example_lengths(cfg)


def tokens_per_step(cfg: Config) -> int:
    """Tokens one optimizer step trains on: batch_size * (encoder + decoder tokens of an example)."""
    return cfg.train.batch_size * sum(example_lengths(cfg))


def run_flops_per_token(cfg: Config) -> float:
    """`train_flops_per_token` of the run's own examples (`example_lengths`), so that
    tokens_per_step(cfg) * run_flops_per_token(cfg) is the compute of one step."""
    return train_flops_per_token(cfg.model, *example_lengths(cfg))


def train_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int = 0) -> float:
    """Model FLOPs to train on one token: `train_flops_per_example` averaged over its
    `seq_len` + `decoder_len` tokens. Decoder at context `seq_len`: 6 * N_matmul +
    6 * L * T * n_heads * head_dim (see the module docstring)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, decoder_len)


def causal_pairs(n: int, window: int | None) -> float:
    """Query-key pairs causal attention over n tokens computes, counted as n^2 / 2; with a
    sliding window W < n (`model.sliding_window`), W n - W^2 / 2 (each query sees at most W keys)."""
    return n * n / 2 if window is None or window >= n else window * n - window * window / 2


def train_flops_per_example(cfg: ModelConfig, first_len: int, second_len: int = 0) -> float:
    """Training FLOPs of one example of `first_len` (a decoder's or encoder's sequence, an
    encoder-decoder's inputs) and `second_len` tokens (an encoder-decoder's targets): for
    every stack, 6 FLOPs per weight and token it runs over (cross-attention keys and values
    per context token), attention 12 * L * n * context * D_attn (6 * L * n^2 when causal; a
    sliding-window layer 12 * (W n - W^2 / 2) * D_attn, `causal_pairs`), and the output head
    over the last stack's tokens (see the module docstring)."""
    lengths, width = (first_len, second_len), cfg.n_heads * cfg.head_dim
    stacks = family_of(cfg).stacks(cfg)
    flops = 6.0 * lengths[stacks[-1].over_targets] * cfg.d_model * cfg.vocab_size  # the output head
    for stack in stacks:
        n = lengths[stack.over_targets]
        weights = stack_params(cfg, stack.n_layers, stack.cross)[1]
        attention = sum(12 * causal_pairs(n, cfg.attention_window(i)) if stack.causal else 12 * n * n
                        for i in range(stack.n_layers))
        if stack.cross:  # keys and values of the context (the first stack's output), once per context token
            cross_kv = stack.n_layers * kv_params(cfg)
            weights -= cross_kv
            flops += 6.0 * first_len * cross_kv
            attention += stack.n_layers * 12 * n * first_len
        flops += 6.0 * n * weights + attention * width
    return flops


def to_petaflop_days(flops: float) -> float:
    """FLOPs -> petaFLOP/s-days (1 PF-day = 8.64e19 FLOPs)."""
    return flops / PETAFLOP_DAY


def total_steps(cfg: Config) -> int:
    """Optimizer steps of the run, from train.steps, train.tokens or train.budget_flops."""
    t = cfg.train
    step_tokens = tokens_per_step(cfg)  # encoder-decoder: input and target tokens
    if t.steps is not None:
        return t.steps
    if t.tokens is not None:
        return math.ceil(t.tokens / step_tokens)
    if t.budget_flops is not None:
        flops_per_step = run_flops_per_token(cfg) * step_tokens
        if t.budget_flops < flops_per_step:
            raise ConfigError(f"train.budget_flops={t.budget_flops:.3g} is less than one step of this model "
                              f"({flops_per_step:.3g} FLOPs for {step_tokens} tokens); raise the budget or "
                              "shrink the model or batch.")
        return math.floor(t.budget_flops / flops_per_step)
    raise ConfigError("the run has no length: set one of train.steps, train.tokens or train.budget_flops.")
