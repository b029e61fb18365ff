"""Typed, frozen run configuration, validated before anything is compiled.

A run is described by one `Config`: the model's shape (`ModelConfig`), the optimizer
(`OptimConfig`), the data (`DataConfig`), the run length and bookkeeping (`TrainConfig`),
the device mesh (`MeshConfig`) and logging (`LogConfig`). Experiments in `experiments/`
build a `Config`; `lmjax.config_parse` reads one from `--set section.field=value` overrides
and from saved JSON. Every mistake raises `ConfigError` with one sentence naming the field and
the fix; a `Literal` field's choices are checked from its type hint (`_check_literals`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from lmjax.spans import span_corruption_lengths

# Ids of the byte tokenizer (lmjax.data.tokenizer.ByteTokenizer): 256 bytes, the special ids
# and the sentinels, a multiple of 128. Written here so that checking a config needs no data code.
BYTE_VOCAB_SIZE = 384


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@functools.cache
def _literal_fields(cls) -> tuple[tuple[str, tuple, bool], ...]:
    """(name, choices, may be None) of each field of dataclass `cls` typed `Literal[...]` or `Literal[...] | None`."""
    fields = []
    for name, hint in typing.get_type_hints(cls).items():
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        choices = tuple(c for o in options if typing.get_origin(o) is Literal for c in typing.get_args(o))
        if choices:
            fields.append((name, choices, type(None) in options))
    return tuple(fields)


def _check_literals(section, prefix: str) -> None:
    """ConfigError naming the field, its value and the choices when a `Literal` field of the
    dataclass `section` holds a value its type does not list (`prefix`: "model.", ...)."""
    for name, choices, optional in _literal_fields(type(section)):
        value = getattr(section, name)
        _require(value in choices or (optional and value is None),
                 f"{prefix}{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


# Capacity dispatch's (B, T, k, E, C) one-hot grows as k^2 (E and C both grow with k at fixed
# capacity factor): more experts per token than this must use dropless dispatch.
MAX_CAPACITY_TOP_K = 8


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers (`n_experts` = 0: every layer dense).

    Each MoE layer routes every token to its `top_k` experts (1: Switch, 2: Mixtral) by a
    float32 router, and adds `n_shared_experts` experts that every token uses (DeepSeek-MoE).
    Layers `every-1, 2*every-1, ...` are MoE; the others keep the dense MLP.

    `granularity` G (Krajewski et al. 2024) splits every expert into G fine-grained ones:
    G * n_experts experts of width d_ff / G, each token using G * top_k of them, so expert
    parameters and FLOPs stay those of G = 1 (the router grows G-fold; shared experts keep
    their G = 1 width). `routing` "experts_choose" (Zhou et al. 2022): each expert picks its
    top C = ceil(capacity_factor * G * top_k * T / (G * n_experts)) tokens of a sequence
    instead of each token picking experts; only for bidirectional stacks, and with
    dispatch="capacity" (exactly C slots per expert; no one-hot is built) (docs/moe.md).
    `router` "softmax" scores experts by a softmax over the router logits (Switch, Mixtral);
    "sigmoid" by an independent sigmoid per expert (DeepSeek-V3). Top-k is chosen on the scores
    plus a per-expert bias (a non-trainable variable, present with a sigmoid router or
    `bias_update_rate` > 0); the gate weights are the chosen unbiased scores. After every
    optimizer step the bias moves by `bias_update_rate` * sign(mean load - load) per expert
    (auxiliary-loss-free balancing, Wang et al. 2024). `sequence_balance_coef` weighs
    DeepSeek-V3's per-sequence balancing loss. See docs/moe.md.
    """

    n_experts: int = 0
    top_k: int = 2
    d_ff: int | None = None  # hidden width of one expert (None: model.d_ff)
    dispatch: Literal["capacity", "dropless"] = "dropless"
    grouped_matmul: Literal["auto", "blocks", "ragged_dot"] = "auto"  # dropless kernel; auto: models.kernels table
    capacity_factor: float = 1.25  # capacity dispatch, training: slots per expert = cf * k * tokens / E
    eval_capacity_factor: float = 2.0  # capacity dispatch, evaluation and generation
    every: int = 1  # MoE in every k-th layer
    n_shared_experts: int = 0
    load_balance_coef: float = 0.01  # Switch loss: n_experts * sum_i f_i * P_i
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss: mean(logsumexp(router logits)^2)
    router_jitter: float = 0.0  # multiplicative uniform noise on router inputs while training
    renormalize: bool = True  # rescale the top-k weights of each token to sum to 1
    granularity: int = 1  # G: G * n_experts experts of width d_ff / G, G * top_k per token
    routing: Literal["tokens_choose", "experts_choose"] = "tokens_choose"  # who chooses: tokens or experts
    router: Literal["softmax", "sigmoid"] = "softmax"  # expert scores: softmax (Mixtral) or sigmoid (DeepSeek-V3)
    bias_update_rate: float = 0.0  # u: selection bias b_i += u * sign(mean load - load_i) per step; 0: no update
    sequence_balance_coef: float = 0.0  # DeepSeek-V3 per-sequence balancing loss: E * sum_i f_i * P_i per row

    def __post_init__(self):
        _check_literals(self, "model.moe.")
        _require(self.n_experts >= 0, f"model.moe.n_experts must be >= 0, got {self.n_experts}.")
        if self.n_experts == 0:
            return
        _require(1 <= self.top_k <= self.n_experts,
                 f"model.moe.top_k={self.top_k} must be between 1 and model.moe.n_experts={self.n_experts}.")
        _require(self.d_ff is None or self.d_ff > 0, f"model.moe.d_ff must be positive or none, got {self.d_ff}.")
        _require(self.capacity_factor > 0 and self.eval_capacity_factor > 0,
                 "model.moe.capacity_factor and model.moe.eval_capacity_factor must be positive.")
        _require(self.every >= 1, f"model.moe.every must be >= 1, got {self.every}.")
        _require(self.n_shared_experts >= 0, f"model.moe.n_shared_experts must be >= 0, got {self.n_shared_experts}.")
        for name in ("load_balance_coef", "z_loss_coef", "router_jitter", "bias_update_rate", "sequence_balance_coef"):
            _require(getattr(self, name) >= 0, f"model.moe.{name} must be >= 0, got {getattr(self, name)}.")
        self._check_routing()

    def _check_routing(self):
        """Granularity and expert choice, and the one-hot size of capacity dispatch."""
        _require(self.granularity >= 1, f"model.moe.granularity must be >= 1, got {self.granularity}.")
        _require(self.routing == "tokens_choose" or self.dispatch == "capacity",
                 "model.moe.routing='experts_choose' fills exactly C = capacity_factor * k * T / E slots per expert, "
                 "which is capacity dispatch; set model.moe.dispatch=capacity.")
        _require(self.routing == "experts_choose" or self.dispatch == "dropless"
                 or self.experts_per_token <= MAX_CAPACITY_TOP_K,
                 f"model.moe.dispatch=capacity with granularity * top_k = {self.experts_per_token} experts per token "
                 f"builds a (B, T, k, E, C) one-hot that grows as k^2; above k = {MAX_CAPACITY_TOP_K} use "
                 "model.moe.dispatch=dropless.")
        _require(self.routing == "tokens_choose" or not (self.router_bias or self.sequence_balance_coef),
                 "model.moe.routing='experts_choose' is balanced by construction; a router bias (router='sigmoid', "
                 "bias_update_rate > 0) and sequence_balance_coef are for tokens_choose.")

    @property
    def n_routed_experts(self) -> int:
        """Routed experts of one MoE layer: granularity * n_experts."""
        return self.granularity * self.n_experts

    @property
    def experts_per_token(self) -> int:
        """Routed experts a token uses (token choice) or the k of the capacity formula: granularity * top_k."""
        return self.granularity * self.top_k

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    @property
    def router_bias(self) -> bool:
        """Whether each MoE layer holds a selection bias (a sigmoid router, or a bias that is updated)."""
        return self.enabled and (self.router == "sigmoid" or self.bias_update_rate > 0)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a transformer of one of three families.

    `family`: "decoder" (causal LM), "encoder" (bidirectional, masked LM) or
    "encoder_decoder" (T5: `n_layers` encoder blocks, `n_decoder_layers` decoder blocks with
    cross-attention, one shared token embedding). Attention has `n_heads` query heads of
    width `d_head` (default `d_model // n_heads`) and `n_kv_heads` key/value heads
    (grouped-query attention when fewer than `n_heads`); its logits are q.k times
    `attention_scale` (default 1/sqrt(head width); T5: 1.0). `position` "relative" is T5's bucketed relative position
    bias: `relative_buckets` buckets, logarithmic beyond half of them up to
    `relative_max_distance`, bidirectional in encoders and causal in decoders.

    `parametrization` "mup" is the maximal-update parametrization (Yang et al., Tensor
    Programs V) relative to lmjax's own init at d_model = `mup_base_width`: there the model
    equals the standard one, and tuned learning rates transfer to other widths (docs/scaling.md).
    Every hidden dimension (d_ff, expert d_ff, heads x head width) is taken to grow with
    d_model, by `width_multiplier` = d_model / mup_base_width. The base constants
    `logit_multiplier` (the head's logits), `embedding_multiplier` (the token embedding's
    output), `attention_multiplier` (the attention temperature) and the per-role init stds
    `init_std_input`/`_hidden`/`_output` (default `init_std`) mean the same under both
    parametrizations; under mup they hold at the base width (the hidden std then scales by
    1/sqrt(m), the rest are kept). `mup_scale_adam_eps` (mup only) takes Adam's epsilon
    (`optim.eps`, its value at the base width) times 1/m, as every role's gradient shrinks
    by 1/m under mup (`adam_eps_multiplier`).
    """

    family: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 384
    d_model: int = 256
    n_layers: int = 4  # the encoder's layers in an encoder_decoder
    n_decoder_layers: int | None = None  # encoder_decoder only; None: n_layers
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    d_head: int | None = None  # width of one attention head; None: d_model // n_heads
    attention_scale: float | None = None  # attention logits = scale * q.k; None: 1 / sqrt(head width)
    d_ff: int = 1024
    # swiglu: silu-gated (LLaMA); gelu: tanh GELU; gelu_exact: erf GELU (BERT); relu: T5;
    # geglu: tanh-GELU-gated (T5 v1.1)
    mlp: Literal["swiglu", "gelu", "gelu_exact", "relu", "geglu"] = "swiglu"
    norm_placement: Literal["pre", "post"] = "pre"  # post (BERT): x = Norm(x + f(x)) in each block, no final norm
    bias: bool = False  # BERT: a bias on every attention and feed-forward projection
    token_types: int = 0  # BERT: rows of a token-type (sentence A/B) embedding added to the input; 0: none
    embed_norm: bool = False  # BERT: a norm over the summed input embeddings
    mlm_head_transform: bool = False  # BERT: dense + activation + norm before the output head, and an output bias
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    position: Literal["rope", "learned", "relative"] = "rope"
    rope_theta: float = 10_000.0
    # RoPE scaling (docs/design.md, "RoPE scaling"): none, linear (positions / factor), llama3 (Llama 3.1's
    # frequency-dependent factor), yarn (NTK-by-parts, and cos/sin times an attention factor)
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_scaling_factor: float = 1.0  # the context extension factor (linear, llama3, yarn)
    rope_original_max_len: int | None = None  # the pretraining context length (llama3, yarn; optional for linear)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / high are kept
    rope_beta_fast: float = 32.0  # yarn: rotations above which dimensions keep their frequency
    rope_beta_slow: float = 1.0  # yarn: rotations below which dimensions are divided by factor
    rope_attention_factor: float | None = None  # yarn: cos/sin multiplier; None: 0.1 ln(factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    # decoder: each query attends to the keys of the last W positions (k > q - W); None: the whole context
    sliding_window: int | None = None
    global_every: int | None = None  # with sliding_window: layers k-1, 2k-1, ... attend globally; None: none do
    relative_buckets: int = 32
    relative_max_distance: int = 128
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    tied_output_rescale: bool = False  # original T5: a tied head reads the final hidden state times d_model**-0.5
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # activations and matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # stored weights
    scan_layers: bool = True  # one compiled layer body, looped; compile time flat in depth
    scan_unroll: int = 1  # layers per loop iteration when scanned (n_layers: fully unrolled)
    # what each layer keeps for the backward pass (lmjax.models.transformer.REMAT_POLICIES)
    remat: Literal["none", "dots", "full", "minimal_with_context", "save_dot_except_mlp", "save_qkv_proj",
                   "save_out_proj"] = "none"
    attention: Literal["auto", "einsum", "dot_product"] = "auto"  # auto: cuDNN on GPU where it can, see models.kernels
    # positions per chunk of the output head's loss (lmjax.models.head): 0 the whole sequence at once;
    # None picks by size: chunks only when the batch's float32 logits would pass 128 MiB on a device
    loss_chunk: int | None = None
    parametrization: Literal["standard", "mup"] = "standard"
    mup_base_width: int | None = None  # mup: the d_model at which it equals the standard parametrization
    # base constants (both parametrizations; under mup they hold at mup_base_width and transfer, docs/scaling.md)
    logit_multiplier: float = 1.0  # the output head's logits times this (under mup also times 1 / m)
    embedding_multiplier: float = 1.0  # the token embedding's output times this
    init_std_input: float | None = None  # embeddings, learned positions, relative-bias tables; None: init_std
    init_std_hidden: float | None = None  # the stack's matrices at the base width (mup: / sqrt(m)); None: init_std
    init_std_output: float | None = None  # the untied head and the MoE router; None: init_std
    attention_multiplier: float = 1.0  # attention temperature: q.k times this on top of attention_logit_scale
    mup_scale_adam_eps: bool = False  # mup only: Adam's epsilon times 1/m (optim.eps holds at the base width)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        _check_literals(self, "model.")
        _require(self.mup_base_width is None or self.mup_base_width > 0,
                 f"model.mup_base_width must be positive, got {self.mup_base_width}.")
        _require(self.parametrization != "mup" or self.mup_base_width is not None,
                 "model.parametrization='mup' needs model.mup_base_width (the d_model whose learning rate was "
                 "tuned); set it, e.g. model.mup_base_width=256.")
        _require(not self.mup_scale_adam_eps or self.parametrization == "mup",
                 "model.mup_scale_adam_eps scales Adam's epsilon with µP's width multiplier; it means nothing under "
                 "model.parametrization='standard' (set optim.eps instead).")
        for name in ("logit_multiplier", "embedding_multiplier", "attention_multiplier"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}.")
        for name in ("init_std_input", "init_std_hidden", "init_std_output"):
            _require(getattr(self, name) is None or getattr(self, name) > 0,
                     f"model.{name} must be positive or none, got {getattr(self, name)}.")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "scan_unroll"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}.")
        _require(self.d_head is None or self.d_head > 0, f"model.d_head must be positive or none, got {self.d_head}.")
        _require(self.attention_scale is None or self.attention_scale > 0,
                 f"model.attention_scale must be positive or none, got {self.attention_scale}.")
        _require(not self.tied_output_rescale or self.tie_embeddings,
                 "model.tied_output_rescale rescales a tied output head; set model.tie_embeddings=true too.")
        _require(
            self.d_head is not None or self.d_model % self.n_heads == 0,
            f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
            "pick a head count that divides the width, or set model.d_head.",
        )
        _require(
            self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
            f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}; "
            "grouped-query attention needs n_heads to be a multiple of n_kv_heads.",
        )
        _require(self.position != "rope" or self.head_dim % 2 == 0,
                 f"RoPE needs an even head width, got {self.head_dim}.")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}.")
        _require(self.token_types >= 0, f"model.token_types must be >= 0, got {self.token_types}.")
        _require(self.norm_placement == "pre" or self.family != "encoder_decoder",
                 "model.norm_placement='post' is for decoder and encoder models (BERT); keep 'pre' here.")
        _require(not (self.bias and self.moe.enabled), "model.bias has no MoE form; MoE experts have no biases.")
        _require(not self.moe.enabled or self.mlp in ("swiglu", "gelu"),
                 f"model.mlp={self.mlp!r} has no MoE form; MoE experts are swiglu or gelu.")
        _require(self.n_decoder_layers is None or self.family == "encoder_decoder",
                 f"model.n_decoder_layers={self.n_decoder_layers} only applies to model.family='encoder_decoder'; "
                 "leave it unset (none).")
        _require(self.decoder_layers > 0, f"model.n_decoder_layers must be positive, got {self.n_decoder_layers}.")
        _require(self.loss_chunk is None or self.loss_chunk >= 0,
                 f"model.loss_chunk must be >= 0 (0: no chunks) or none (by size), got {self.loss_chunk}.")
        _require(self.relative_buckets >= 2 and self.relative_max_distance > self.relative_buckets // 2,
                 f"model.relative_buckets={self.relative_buckets} must be >= 2 and model.relative_max_distance="
                 f"{self.relative_max_distance} larger than half of it (T5: 32 and 128).")
        self._check_moe_shape()
        _require(not self.moe.enabled or self.n_layers % self.moe.every == 0,
                 f"model.moe.every={self.moe.every} does not divide model.n_layers={self.n_layers}.")
        _require(not self.moe.enabled or self.decoder_layers % self.moe.every == 0,
                 f"model.moe.every={self.moe.every} does not divide model.n_decoder_layers={self.n_decoder_layers}.")
        self._check_long_context()

    def _check_long_context(self) -> None:
        """Sliding windows and RoPE scaling: settings that make no sense raise ConfigError."""
        _require(self.sliding_window is None or self.sliding_window > 0,
                 f"model.sliding_window must be a positive number of positions or none, got {self.sliding_window}.")
        if self.sliding_window is not None:
            _require(self.family == "decoder", f"model.sliding_window is for the decoder family (causal "
                     f"self-attention); unset it for model.family={self.family!r}.")
            _require(self.position != "relative", "model.sliding_window takes rope or learned positions, not "
                     "model.position='relative'.")
        _require(self.global_every is None or self.sliding_window is not None,
                 "model.global_every interleaves global layers with sliding-window ones; set model.sliding_window.")
        _require(self.global_every is None or (self.global_every >= 1 and self.n_layers % self.global_every == 0),
                 f"model.global_every={self.global_every} must be >= 1 and divide model.n_layers={self.n_layers}.")
        if self.rope_scaling == "none":
            return
        scaling = f"model.rope_scaling={self.rope_scaling!r}"
        _require(self.position == "rope", f"{scaling} scales rotary positions; set model.position='rope'.")
        _require(self.rope_scaling_factor > 0, f"{scaling} needs model.rope_scaling_factor > 0, got "
                 f"{self.rope_scaling_factor}.")
        _require(self.rope_original_max_len is None or self.rope_original_max_len > 0,
                 f"model.rope_original_max_len must be positive or none, got {self.rope_original_max_len}.")
        _require(self.rope_scaling == "linear" or self.rope_original_max_len is not None,
                 f"{scaling} needs model.rope_original_max_len, the pretraining context length.")
        _require(self.rope_scaling != "llama3" or 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                 f"{scaling} needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, got "
                 f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}.")
        _require(self.rope_scaling != "yarn" or (self.rope_beta_fast > 0 and self.rope_beta_slow > 0),
                 f"{scaling} needs model.rope_beta_fast and model.rope_beta_slow > 0, got {self.rope_beta_fast} "
                 f"and {self.rope_beta_slow}.")
        _require(self.rope_attention_factor is None or self.rope_attention_factor > 0,
                 f"model.rope_attention_factor must be positive or none, got {self.rope_attention_factor}.")

    def _check_moe_shape(self):
        """Granularity divides the expert width; expert choice only in bidirectional stacks."""
        if not self.moe.enabled:
            return
        width, g = self.moe.d_ff or self.d_ff, self.moe.granularity
        _require(width % g == 0, f"model.moe.granularity={g} does not divide the expert width {width} "
                 f"({'model.moe.d_ff' if self.moe.d_ff else 'model.d_ff'}); pick a divisor of it.")
        _require(self.moe.routing == "tokens_choose" or self.family != "decoder",
                 "model.moe.routing='experts_choose' lets a token's routing depend on later tokens, which a causal "
                 "decoder must not see; use it with model.family=encoder or encoder_decoder (its encoder stack), "
                 "or keep tokens_choose.")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def decoder_layers(self) -> int:
        """Blocks of the decoder stack of an encoder_decoder (n_decoder_layers, default n_layers)."""
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def stack_layers(self) -> dict[str, int]:
        """Blocks of each stack, by the setting that sizes it: model.n_layers, and an encoder_decoder's
        model.n_decoder_layers too."""
        decoder = {"model.n_decoder_layers": self.decoder_layers} if self.family == "encoder_decoder" else {}
        return {"model.n_layers": self.n_layers, **decoder}

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_head, or d_model // n_heads."""
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def attention_logit_scale(self) -> float:
        """What q.k is multiplied by before the softmax: attention_multiplier times
        attention_scale, or times 1 / sqrt(head_dim).

        Under mup with the head width growing with d_model (d_head unset, so the head count is
        fixed), µP's 1 / head_dim rule corrected to equal 1 / sqrt(head_dim) at the base width:
        1 / sqrt(h) * sqrt(h_base / h), h_base = mup_base_width / n_heads. With d_head set the
        head width is fixed (widen by adding heads) and the scale stays 1 / sqrt(d_head).
        """
        if self.attention_scale is not None:
            scale = self.attention_scale
        elif self.parametrization == "mup" and self.d_head is None:
            scale = self.head_dim**-0.5 * (self.mup_base_width / self.n_heads / self.head_dim) ** 0.5
        else:
            scale = self.head_dim**-0.5
        return scale * self.attention_multiplier

    @property
    def width_multiplier(self) -> float:
        """µP's m = d_model / mup_base_width (1.0 under the standard parametrization)."""
        return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def input_init_std(self) -> float:
        """Init std of the input role (embeddings, learned positions, relative-bias tables):
        init_std_input, or init_std."""
        return self.init_std if self.init_std_input is None else self.init_std_input

    @property
    def output_init_std(self) -> float:
        """Init std of the output role (untied head, MoE router): init_std_output or init_std."""
        return self.init_std if self.init_std_output is None else self.init_std_output

    @property
    def hidden_init_std(self) -> float:
        """Init std of the stack's matrices: init_std_hidden (or init_std), times sqrt(1 / m)
        under mup (their fan-in grows by m)."""
        std = self.init_std if self.init_std_hidden is None else self.init_std_hidden
        if self.parametrization == "mup":
            return std * (self.mup_base_width / self.d_model) ** 0.5
        return std

    @property
    def residual_init_std(self) -> float:
        """Init std of the matrices that write into the residual stream (attention and MLP
        outputs): hidden_init_std / sqrt(2 n_layers) (GPT-2)."""
        return self.hidden_init_std / (2 * self.n_layers) ** 0.5

    @property
    def output_multiplier(self) -> float:
        """What output-like layers (the logits, the MoE router's logits) are multiplied by:
        1 / m under mup, 1.0 otherwise."""
        return self.mup_base_width / self.d_model if self.parametrization == "mup" else 1.0

    @property
    def adam_eps_multiplier(self) -> float:
        """What Adam's epsilon (optim.eps) is multiplied by: 1 / m under mup with
        `mup_scale_adam_eps`, else 1.0. Under mup every role's gradient (embeddings, hidden
        matrices, head, router, norm gains) shrinks as 1 / m per coordinate, since the loss's
        gradient with respect to every activation does (measured: log-log slopes -0.8 to -1.1
        over widths 64-512, docs/scaling.md); epsilon keeps its ratio to them (Everett et al.
        2024, "Scaling Exponents Across Parameterizations and Optimizers", section 5)."""
        return self.output_multiplier if self.mup_scale_adam_eps else 1.0

    @property
    def logit_scale(self) -> float:
        """What the output head's logits are multiplied by: logit_multiplier times output_multiplier."""
        return self.logit_multiplier * self.output_multiplier

    @property
    def gated_mlp(self) -> bool:
        """Whether the feed-forward has a gate matrix besides up and down (swiglu, geglu)."""
        return self.mlp in ("swiglu", "geglu")

    @property
    def expert_d_ff(self) -> int:
        """Hidden width of one routed expert: (moe.d_ff or d_ff) / moe.granularity."""
        return (self.moe.d_ff or self.d_ff) // self.moe.granularity

    @property
    def shared_d_ff(self) -> int:
        """Hidden width of the shared experts together: n_shared_experts * (moe.d_ff or d_ff), whatever G."""
        return self.moe.n_shared_experts * (self.moe.d_ff or self.d_ff)

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based), or None where it attends over the whole context."""
        if self.sliding_window is None or (self.global_every and (layer + 1) % self.global_every == 0):
            return None
        return self.sliding_window

    @property
    def context_length(self) -> int:
        """The longest input the model takes: max_seq_len, or, with a RoPE scaling and its original
        length, rope_scaling_factor x rope_original_max_len when that is longer."""
        if self.rope_scaling == "none" or self.rope_original_max_len is None:
            return self.max_seq_len
        return max(self.max_seq_len, int(self.rope_scaling_factor * self.rope_original_max_len))

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a MoE feed-forward instead of the dense MLP."""
        return self.moe.enabled and (layer + 1) % self.moe.every == 0

    @property
    def layer_cycle(self) -> int:
        """Blocks of one scanned step: lcm(moe.every, global_every), the shortest run of layers
        after which the pattern of MoE and sliding-window blocks repeats (1 when uniform)."""
        return math.lcm(self.moe.every if self.moe.enabled else 1, self.global_every or 1)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then a cosine, linear, constant or warmup-stable-decay schedule,
    and global-norm clipping.

    "wsd" (warmup-stable-decay) holds `lr` after warmup and decays linearly to
    `lr * min_lr_ratio` over the last `decay_fraction` of the steps; runs of different
    lengths share the stable phase, so one long run can be branched into cooldowns.
    """

    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear and wsd)
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only: never norms, biases or embeddings
    clip_norm: float | None = 1.0  # None: no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    master_weights: bool = False  # keep float32 master weights of bfloat16 params (model.param_dtype) in the optimizer

    def __post_init__(self):
        _check_literals(self, "optim.")
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}.")
        _require(0.0 < self.decay_fraction <= 1.0,
                 f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "optim.beta1 and optim.beta2 must be in [0, 1).")
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}.")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        _require(self.clip_norm is None or self.clip_norm > 0,
                 f"optim.clip_norm must be positive or none, got {self.clip_norm}.")
        _require(self.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}.")

    def wsd_decay_start(self, total_steps: int) -> int:
        """The step where a warmup-stable-decay schedule's final linear decay begins: the last
        round(decay_fraction * total_steps) steps (at least 1) decay, but never before warmup ends."""
        warmup = min(self.warmup_steps, total_steps)
        return total_steps - min(max(1, round(self.decay_fraction * total_steps)), total_steps - warmup)


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes fixed-length training sequences.

    `source` is "stdlib" (the running Python's standard-library sources, always present)
    or a path to a text/JSONL/Parquet file, a directory of them, or an HF dataset saved
    with `save_to_disk`; it is read and tokenized in memory at start-up. `path` instead
    names data made by `lmjax data prepare` (and then `source` is ignored): one directory,
    or a weighted mixture "DIR1:0.7,DIR2:0.3" (weights > 0, normalised). See docs/data.md.
    """

    source: str = "stdlib"
    text_field: str = "text"  # JSONL key / Parquet or HF column holding the text
    max_bytes: int | None = 8_000_000  # read at most this much text (None: everything)
    tokenizer: str = "bytes"  # "bytes", a tokenizers .json / SentencePiece .model file, or "none" (no text)
    path: str | None = None  # prepared data: DIR or DIR1:w1,DIR2:w2 (weighted mixture)
    seq_len: int = 256  # tokens per sequence; encoder_decoder: the encoder inputs' length
    mlm_probability: float = 0.15  # encoder: share of tokens selected for the masked-LM loss (BERT)
    noise_density: float = 0.15  # encoder_decoder: share of raw tokens corrupted into noise spans (T5)
    mean_noise_span_length: float = 3.0  # encoder_decoder: mean length of a noise span (T5)
    val_fraction: float = 0.02  # share of documents (prepared data: of the final windows) held out for validation
    seed: int = 0  # data order is a pure function of (seed, step)
    workers: int = 0  # batch-reading worker processes (0: reader threads in the training process)
    verify_shards: bool = True  # check prepared shards' SHA-256 at start-up (~1 s/GB; `lmjax data verify` does it once)

    def mixture(self) -> list[tuple[str, float]]:
        """[(directory, weight)] of `path`: "DIR" is [(DIR, 1.0)]."""
        parts = []
        for item in (self.path or "").split(","):
            directory, _, weight = item.rpartition(":")
            try:
                parts.append((directory, float(weight)) if directory else (item, 1.0))
            except ValueError:
                parts.append((item, 1.0))  # a colon inside the directory name, no weight
        return parts

    def __post_init__(self):
        _check_literals(self, "data.")
        _require(bool(self.source), "data.source is empty; give 'stdlib' or a path to your text.")
        _require(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}.")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}.")
        _require(self.max_bytes is None or self.max_bytes > 0,
                 f"data.max_bytes must be positive or none, got {self.max_bytes}.")
        _require(bool(self.tokenizer), "data.tokenizer is empty; give 'bytes' or a tokenizer file.")
        _require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}.")
        if self.path is not None:
            for directory, weight in self.mixture():
                _require(bool(directory), f"data.path {self.path!r} has an empty directory; write DIR1:0.7,DIR2:0.3.")
                _require(weight > 0, f"data.path weight {weight:g} for {directory} must be > 0; drop the dataset "
                         "or give it a positive weight.")
        _require(0.0 < self.mlm_probability < 1.0,
                 f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        _require(0.0 < self.noise_density < 1.0, f"data.noise_density must be in (0, 1), got {self.noise_density}.")
        _require(self.mean_noise_span_length >= 1.0,
                 f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}.")


# losses of the most recent applied steps that a loss spike is judged against (train.spike_sigmas); fixed,
# because the train state holds them and a checkpoint's shapes may not change
SPIKE_WINDOW = 100


@dataclass(frozen=True)
class TrainConfig:
    """Run length, batch, evaluation, checkpointing and the sample printed at the end.

    The run length is given by exactly one of `steps`, `tokens` or `budget_flops`
    (training FLOPs, counted as `lmjax.scaling.counting.train_flops_per_token` per token).
    """

    batch_size: int = 32  # global batch, in sequences
    steps: int | None = None
    tokens: int | None = None
    budget_flops: float | None = None
    halt_at_step: int | None = None  # stop early (saving a checkpoint) as if preempted
    seed: int = 0  # parameter init and dropout
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    run_dir: str | None = None  # None: runs/<experiment>-<timestamp>
    sample_prompt: str = "def "
    sample_tokens: int = 200  # tokens generated after training (0: no sample)
    sample_temperature: float = 0.8
    # like SIGTERM: save and stop (SLURM's --signal=USR1@SECONDS warning)
    warning_signal: Literal["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGALRM"] = "SIGUSR1"
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache here (None: off)
    # Bad steps (lmjax.train.guard): a step whose loss or gradient norm is not finite, or whose loss is
    # more than `spike_sigmas` standard deviations above the mean of the last 100 applied steps' losses
    # (judged once `spike_min_steps` of them are in; None: spikes are not judged), is bad. With
    # `skip_bad_steps` its update is not applied (its batch is used up). After `max_bad_steps` bad steps
    # in a row the run restores its newest checkpoint and skips `rollback_skip_batches` batches, at most
    # `max_rollbacks` times; then it stops with exit code 3.
    skip_bad_steps: bool = True
    spike_sigmas: float | None = 6.0
    spike_min_steps: int = 50
    max_bad_steps: int = 10
    rollback_skip_batches: int = 200
    max_rollbacks: int = 3
    # seconds without a finished step before the run writes every thread's stack to hang-<process>.txt and exits
    # with code 4 (lmjax.train.watchdog); None: 10x the median step time, at least 300 s; 0: off
    step_timeout: float | None = None

    def __post_init__(self):
        _check_literals(self, "train.")
        given = [n for n in ("steps", "tokens", "budget_flops") if getattr(self, n) is not None]
        _require(len(given) <= 1,
                 f"give only one of train.steps, train.tokens, train.budget_flops (got {', '.join(given)}).")
        for name in ("batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}.")
        for name in ("steps", "tokens", "budget_flops", "halt_at_step"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"train.{name} must be positive, got {value}.")
        _require(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}.")
        _require(self.sample_tokens == 0 or self.sample_prompt != "",
                 "train.sample_prompt is empty; give a prompt, or set train.sample_tokens=0 for no sample.")
        _require(self.sample_temperature >= 0, f"train.sample_temperature must be >= 0, got {self.sample_temperature}.")
        _require(self.spike_sigmas is None or self.spike_sigmas > 0,
                 f"train.spike_sigmas must be positive or none (no spike check), got {self.spike_sigmas}.")
        _require(2 <= self.spike_min_steps <= SPIKE_WINDOW,
                 f"train.spike_min_steps must be in [2, {SPIKE_WINDOW}] (the losses kept), got {self.spike_min_steps}.")
        _require(self.step_timeout is None or self.step_timeout >= 0,
                 f"train.step_timeout must be >= 0 seconds (0: off) or none (automatic), got {self.step_timeout}.")
        for name in ("max_bad_steps", "rollback_skip_batches", "max_rollbacks"):
            _require(getattr(self, name) >= (1 if name == "max_bad_steps" else 0),
                     f"train.{name} must be >= {1 if name == 'max_bad_steps' else 0}, got {getattr(self, name)}.")


# The device mesh's axes, outermost first (`lmjax.parallel.make_mesh`); the logical-axis rules
# (`lmjax.axis_rules`) say which model dimensions each one splits.
MESH_AXES = ("pipeline", "data", "fsdp", "context", "tensor", "expert")
# The axes that may span the slow network between nodes or TPU slices (`mesh.dcn_<axis>`).
DCN_AXES = ("pipeline", "data", "fsdp")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape (one field per axis of MESH_AXES); one axis may be -1 to take the
    remaining devices.

    `dcn_pipeline`, `dcn_data` and `dcn_fsdp` say how many of the pipeline / data / fsdp groups
    lie across the slow network between hosts (GPU nodes, processes) or TPU slices; the rest of
    each axis stays within a host or slice (ICI/NVLink). Their product must equal the number of
    hosts/slices.

    `pipeline` splits the layer stack into that many stages (docs/launch.md). Two settings of
    the pipeline schedule are not axis sizes: `pipeline_microbatches` M, how many pieces each
    (accumulation) micro-step's batch is cut into for the stages to work on at once (none: as
    many as stages), and `pipeline_repeats` R, the virtual stages per device of a circular
    schedule (1: GPipe). The bubble, the share of stage time spent idle, is (P-1)/(M*R+P-1).

    `context` splits each sequence's positions (activations, not weights) over that many
    devices: context parallelism for long sequences (docs/launch.md#long-sequences-context-parallelism).
    """

    pipeline: int = 1
    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1
    expert: int = 1
    dcn_pipeline: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    pipeline_microbatches: int | None = None
    pipeline_repeats: int = 1

    def __post_init__(self):
        _check_literals(self, "mesh.")
        sizes = tuple(self.axis_sizes().values())
        _require(all(s == -1 or s >= 1 for s in sizes), f"mesh axes must be >= 1 or -1, got {self.axis_sizes()}.")
        _require(sizes.count(-1) <= 1, "at most one mesh axis may be -1 (fill the remaining devices).")
        _require(all(s >= 1 for s in self.dcn_sizes().values()),
                 f"{', '.join(f'mesh.dcn_{a}' for a in DCN_AXES)} must be >= 1.")
        _require(self.pipeline_microbatches is None or self.pipeline_microbatches >= 1,
                 f"mesh.pipeline_microbatches must be >= 1 or none (as many as stages), got "
                 f"{self.pipeline_microbatches}.")
        _require(self.pipeline_repeats >= 1, f"mesh.pipeline_repeats must be >= 1, got {self.pipeline_repeats}.")

    def axis_sizes(self, n_devices: int | None = None) -> dict[str, int]:
        """{axis: size} over MESH_AXES; with `n_devices`, a -1 axis takes what the others leave
        (at least 1; whether the product matches the devices is `lmjax.parallel`'s check)."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        if n_devices is not None and -1 in sizes.values():
            fixed = math.prod(s for s in sizes.values() if s != -1)
            sizes = {axis: max(1, n_devices // fixed) if s == -1 else s for axis, s in sizes.items()}
        return sizes

    def dcn_sizes(self) -> dict[str, int]:
        """{axis: how many of its groups span the slow network} over MESH_AXES (1 off DCN_AXES)."""
        return {axis: getattr(self, f"dcn_{axis}") if axis in DCN_AXES else 1 for axis in MESH_AXES}

    def microbatches(self, stages: int) -> int:
        """M of a pipeline of `stages` stages: mesh.pipeline_microbatches, or `stages` when none."""
        return self.pipeline_microbatches or stages

    def bubble_fraction(self, stages: int) -> float:
        """The share of a pipeline step that each of `stages` stages spends idle while the
        first microbatches fill it and the last drain it: (P-1)/(M*R+P-1); 0 with one stage."""
        return (stages - 1) / (self.microbatches(stages) * self.pipeline_repeats + stages - 1)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters trained on the frozen weights of another run (`rank` 0: off).

    Each targeted weight W, viewed as a matrix (inputs x outputs, per layer and expert), is
    used as W + (alpha / rank) A B with A (inputs, rank) Gaussian and B (rank, outputs) zero
    at the start. `targets`: comma-separated module roles (`attention`: wq wk wv wo, self and
    cross; `mlp`: w_up w_gate w_down, experts included) or regular expressions searched in
    parameter paths such as `stack/blocks/attn/wq`. `base`: the run whose newest weights are
    frozen under the adapters (`lmjax train --init-from RUN_DIR` sets it).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: str = "attention,mlp"
    base: str | None = None

    def __post_init__(self):
        _check_literals(self, "lora.")
        _require(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}.")
        _require(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}.")
        _require(bool(self.targets.strip(",").strip()), "lora.targets is empty; name roles (attention,mlp) or a "
                 "regex on parameter paths.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class QuantConfig:
    """int8 weights. On a training run, `weights` "int8" is quantization-aware training: the
    forward pass fake-quantizes every matrix a matmul reads (qwix's QtProvider, one scale per
    output unit). A run directory written by `lmjax quantize` (it holds quantized.safetensors)
    records "int8" too: its matrices are stored int8 with float32 scales, one per output unit
    (`granularity` "channel") or per matrix ("tensor"). See docs/after_pretraining.md."""

    weights: Literal["none", "int8"] = "none"
    granularity: Literal["channel", "tensor"] = "channel"

    def __post_init__(self):
        _check_literals(self, "quant.")


@dataclass(frozen=True)
class LogConfig:
    wandb: Literal["off", "offline", "online"] = "offline"
    wandb_project: str = "lmjax"
    progress_bar: bool = True

    def __post_init__(self):
        _check_literals(self, "log.")


@dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    @property
    def targets_length(self) -> int:
        """Target positions of one example: data.seq_len, or an encoder_decoder's span-corruption
        targets (ValueError for a length span corruption cannot make)."""
        if self.model.family != "encoder_decoder":
            return self.data.seq_len
        return span_corruption_lengths(self.data.seq_len, self.data.noise_density, self.data.mean_noise_span_length)[1]

    def __post_init__(self):
        # a tokenizer file's vocabulary is checked when it is loaded, still before compiling
        tokenizer_vocab = BYTE_VOCAB_SIZE if self.data.tokenizer == "bytes" else 0
        _require(
            self.model.vocab_size >= tokenizer_vocab,
            f"model.vocab_size={self.model.vocab_size} is smaller than the {self.data.tokenizer} tokenizer's "
            f"{tokenizer_vocab} ids; set model.vocab_size >= {tokenizer_vocab}.",
        )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            "shorten the sequences or raise model.max_seq_len.",
        )
        try:
            targets_length = self.targets_length
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model.family == "encoder_decoder":
            _require(targets_length <= self.model.max_seq_len,
                     f"span corruption targets of {targets_length} tokens exceed model.max_seq_len="
                     f"{self.model.max_seq_len}; raise model.max_seq_len.")
        _require(not self.model.loss_chunk or targets_length % self.model.loss_chunk == 0,
                 f"model.loss_chunk={self.model.loss_chunk} does not divide the {targets_length} target positions "
                 "of each example; pick a divisor, 0 (no chunks) or none (by size).")
        _require(
            self.train.batch_size % self.optim.grad_accum_steps == 0,
            f"train.batch_size={self.train.batch_size} is not divisible by optim.grad_accum_steps="
            f"{self.optim.grad_accum_steps}.",
        )
        _require(not self.optim.master_weights or self.model.param_dtype == "bfloat16",
                 "optim.master_weights keeps float32 copies of bfloat16 params; set model.param_dtype=bfloat16 "
                 "or optim.master_weights=false.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
