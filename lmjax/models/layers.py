"""Transformer components: norms, embeddings, attention (rotary positions: `models.rope`) and MLPs.

Shapes use B = batch, T = query length, S = key length, D = d_model, N = query heads,
K = key/value heads, H = head width, F = d_ff, V = vocabulary. Parameters are stored in
`param_dtype` and cast to the compute `dtype` where they are used; every parameter carries
logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `length`),
which `lmjax.axis_rules` maps to mesh axes, and a role (`ROLES`), which the optimizer reads.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmjax.axis_rules import constrain, sequence_shards
from lmjax.config import ModelConfig
from lmjax.models.kernels import AttentionMask, select_attention
from lmjax.models.rope import rope, rope_frequencies
from lmjax.models.weights import matmul, take_rows

# What a parameter does, carried as its `role` metadata (like its logical axes); the optimizer
# reads roles, never attribute names (weight decay: `lmjax.train.optimizer`).
#   input:  rows looked up by an id: token embeddings, learned positions, relative-bias tables
#   hidden: matrices inside the stack: attention, MLP and expert weights
#   output: matrices whose outputs are scores over a choice: the output head, the MoE router
#   vector: norm gains and biases
ROLES = ("input", "hidden", "output", "vector")
CONTEXT_OBSTACLE = "a sequence split over devices (context parallelism; the mask is by position)"


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float | None, dtype, *,
          role: str) -> nnx.Param:
    """A parameter with logical axis names and a role (`ROLES`): normal(0, std) init, ones if
    std is None, zeros if std is 0."""
    if role not in ROLES:
        raise ValueError(f"parameter role {role!r} is not one of {ROLES}.")
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, role=role)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32. (..., D) -> (..., D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.scale = param(rngs, (cfg.d_model,), ("embed",), None, cfg.param_dtype, role="vector")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, computed in float32. (..., D) -> (..., D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.scale = param(rngs, (cfg.d_model,), ("embed",), None, cfg.param_dtype, role="vector")
        self.bias = param(rngs, (cfg.d_model,), ("embed",), 0, cfg.param_dtype, role="vector")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    return RMSNorm(cfg, rngs=rngs) if cfg.norm == "rmsnorm" else LayerNorm(cfg, rngs=rngs)


def attention_mask(segment_ids, causal: bool, positions=None):
    """Boolean mask (B, 1, T, T): True where query t may attend to key s.

    Tokens attend only within their own segment (packed documents); segment id 0 is
    padding and attends nowhere. With `causal`, also only to keys at or before the query:
    by `positions` (B, T) when given (then a row's tokens may come in any order, as context
    parallelism's load-balanced layout has them; positions grow within a segment), else by index.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same & (segment_ids[:, :, None] != 0)
    if causal and positions is not None:
        mask = mask & (positions[:, None, :] <= positions[:, :, None])
    elif causal:
        t = segment_ids.shape[1]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    return mask[:, None, :, :]


def relative_position_bucket(relative, bidirectional: bool, n_buckets: int, max_distance: int):
    """T5's bucket of each relative position `relative` = key position - query position (int array).

    Bidirectional: half the buckets for keys after the query, half for keys at or before it.
    Causal: keys after the query all share bucket 0. Within a half of b buckets, distances
    below b/2 get a bucket each; larger ones share buckets spaced logarithmically up to
    `max_distance`, beyond which all fall in the last bucket.
    """
    if bidirectional:
        n_buckets //= 2
        offset = jnp.where(relative > 0, n_buckets, 0)
        distance = jnp.abs(relative)
    else:
        offset = 0
        distance = jnp.maximum(-relative, 0)
    n_exact = n_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / n_exact) / math.log(max_distance / n_exact)
    far = n_exact + (log_ratio * (n_buckets - n_exact)).astype(jnp.int32)
    far = jnp.minimum(far, n_buckets - 1)
    return offset + jnp.where(distance < n_exact, distance, far)


class RelativePositionBias(nnx.Module):
    """T5 relative position bias: one learned scalar per (bucket, head), shared by all layers
    of a stack. `__call__(query_positions (B, T), key_positions (B, S)) -> (B, N, T, S) float32`."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        self.cfg, self.bidirectional = cfg, bidirectional
        self.table = param(rngs, (cfg.relative_buckets, cfg.n_heads), ("relative_buckets", "heads"), cfg.input_init_std,
                           cfg.param_dtype, role="input")

    def __call__(self, query_positions, key_positions):
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # (B, T, S)
        buckets = relative_position_bucket(relative, self.bidirectional, self.cfg.relative_buckets,
                                           self.cfg.relative_max_distance)
        bias = take_rows(self.table[...], buckets, jnp.float32)  # (B, T, S, N)
        return jnp.transpose(bias, (0, 3, 1, 2))


def attention_probabilities(q, k, mask, bias=None, scale: float | None = None):
    """softmax(scale * q k^T + bias) over the keys, with grouped-query heads.

    q (B, T, N, H), k (B, S, K, H) with N a multiple of K (query head n reads key head
    n // (N / K)); mask (B, 1, T, S) bool; bias None or (B, N, T, S) float32; scale default
    1/sqrt(H). Scores and softmax in float32. Returns (B, N, T, S) float32; masked keys get
    probability 0.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = q.reshape(b, t, kv_heads, n // kv_heads, h) * scale
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32).reshape(b, n, t, -1)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def einsum_attention(q, k, v, mask, bias=None, scale: float | None = None):
    """`attention_probabilities` applied to the values v (B, S, K, H), written out for XLA.
    Returns (B, T, N, H). On CPU its backward pass runs ~2x faster than
    jax.nn.dot_product_attention's."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    probs = attention_probabilities(q, k, mask, bias, scale).astype(v.dtype).reshape(b, kv_heads, n // kv_heads, t, -1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


class Attention(nnx.Module):
    """Multi-head / grouped-query self- or cross-attention, with RoPE when the config asks
    for it (never in cross-attention, whose keys have no position relative to the queries).

    (B, T, D) -> (B, T, D). `model.attention` picks the kernel (`lmjax.models.kernels`):
    "einsum" the written-out form, "dot_product" `jax.nn.dot_product_attention` (XLA), "auto"
    cuDNN flash attention on GPU where the mask allows it, XLA's otherwise, einsum off GPU.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        self.cfg = cfg
        self.rotary = cfg.position == "rope" and not cross
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        std, out_std = cfg.hidden_init_std, cfg.residual_init_std
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, cfg.param_dtype, role="hidden")
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype, role="hidden")
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype, role="hidden")
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, cfg.param_dtype, role="hidden")
        if cfg.bias:
            self.bq = zero_bias(cfg, rngs, (n, h), ("heads", "head_dim"))
            self.bk = zero_bias(cfg, rngs, (k, h), ("kv_heads", "head_dim"))
            self.bv = zero_bias(cfg, rngs, (k, h), ("kv_heads", "head_dim"))
            self.bo = zero_bias(cfg, rngs, (d,), ("embed",))

    def keys_values(self, source):
        """Keys and values (k, v), each (B, S, K, H), of `source` (B, S, D); for cross-attention
        a decoder computes them from the encoder output once and passes them as `context`."""
        return add_bias(self, "bk", matmul(source, self.wk[...])), add_bias(self, "bv", matmul(source, self.wv[...]))

    def _project(self, x, positions, context):
        """Queries (B, T, N, H) of x, and keys and values (B, S, K, H) of x or `context`
        (see `__call__`), rotated by RoPE when the layer uses it."""
        q = checkpoint_name(add_bias(self, "bq", matmul(x, self.wq[...])), "query_proj")
        if isinstance(context, tuple):
            k, v = (a.astype(q.dtype) for a in context)
        else:
            k, v = self.keys_values(x if context is None else context)
            k, v = checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
        if self.rotary:
            inv_freq, factor = rope_frequencies(self.cfg)
            q, k = rope(q, positions, inv_freq, factor), rope(k, positions, inv_freq, factor)
        return q, k, v

    def probabilities(self, x, positions, mask, bias=None, context=None):
        """The attention probabilities (B, N, T, S) float32 that `__call__` (without a cache)
        computes for the same arguments (`attention_probabilities`)."""
        q, k, _ = self._project(x, positions, context)
        return attention_probabilities(q, k, AttentionMask.of(mask).dense, bias, self.cfg.attention_logit_scale)

    def __call__(self, x, positions, mask, cache=None, bias=None, context=None, ring_write=None):
        """x (B, T, D); positions (B, T) int; mask an `AttentionMask` or a bare (B, 1, T, S) bool
        array -> (B, T, D).

        Keys and values come from x (self-attention, S = T) or from `context` (cross-attention):
        the encoder output (B, S, D), or its `keys_values` (k, v) already computed. `bias`
        (B, N, T, S) float32 is added to the scores (T5 relative positions). With `cache` =
        (keys, values), each (B, S, K, H), this call's keys and values are first written into it
        at `positions` (row by row), the queries attend over all S cached slots, and the result
        is (output, updated cache). With `ring_write` (a sliding-window layer, `models.window`) the
        cache is a ring buffer of R slots: the queries attend over the ring then this call's keys
        (mask (B, 1, T, R + T)), and `ring_write` writes the newest keys into the ring.
        """
        cfg = self.cfg
        q, k, v = self._project(x, positions, context)
        if ring_write is not None:
            (k, v), cache = ring_write.attend_and_write(cache, k, v)
        elif cache is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            cache = (cache[0].at[rows, positions].set(k.astype(cache[0].dtype)),
                     cache[1].at[rows, positions].set(v.astype(cache[1].dtype)))
            k, v = cache[0].astype(q.dtype), cache[1].astype(q.dtype)
        mask = AttentionMask.of(mask)
        if cache is None and sequence_shards() > 1:
            q, k, v, mask = context_parallel_layout(q, k, v, mask)
        kernel = select_attention(cfg.attention, mask, bias is not None, q.dtype, q.shape[-1])
        if kernel == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, scale=cfg.attention_logit_scale, is_causal=mask.causal,
                                               query_seq_lengths=mask.query_lengths,
                                               key_value_seq_lengths=mask.key_lengths, implementation="cudnn")
        elif kernel == "xla":
            out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                               mask=mask.dense, scale=cfg.attention_logit_scale, implementation="xla")
        else:
            out = einsum_attention(q, k, v, mask.dense, bias, cfg.attention_logit_scale)
        out = add_bias(self, "bo", matmul(checkpoint_name(out, "context"), self.wo[...], n_in=2))
        out = checkpoint_name(out, "out_proj")
        return out if cache is None else (out, cache)


def context_parallel_layout(q, k, v, mask: AttentionMask):
    """Queries (B, T, N, H) stay split along the sequence like the activations; keys and values
    (B, S, K, H), projected from each device's own positions, are gathered whole
    (`activation_kv_length`), so each device attends its own queries to every key (MaxText's
    all-gather context parallelism). The mask, by position, is kept even where a fused kernel
    could run: its causal flag would count the reordered indices."""
    q = constrain(q, ("batch", "activation_length", "heads", "head_dim"))
    local, whole = (("batch", length, "kv_heads", "head_dim")
                    for length in ("activation_length", "activation_kv_length"))
    k, v = (constrain(constrain(a, local), whole) for a in (k, v))  # computed on the own positions, then gathered
    return q, k, v, dataclasses.replace(mask, not_fusable=mask.not_fusable or CONTEXT_OBSTACLE)


ACTIVATIONS = {"swiglu": jax.nn.silu, "gelu": jax.nn.gelu, "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
               "relu": jax.nn.relu, "geglu": jax.nn.gelu}


def zero_bias(cfg: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    """A bias initialised to zeros (`model.bias`, BERT's projections)."""
    return param(rngs, shape, axes, 0, cfg.param_dtype, role="vector")


def add_bias(module: nnx.Module, name: str, y):
    """y + module.<name> when the module has that bias, else y."""
    return y + getattr(module, name)[...].astype(y.dtype) if hasattr(module, name) else y


class MLP(nnx.Module):
    """Position-wise feed-forward, by `model.mlp`: gated, w_down(act(x w_gate) * x w_up), with
    act silu (swiglu) or tanh GELU (geglu, T5 v1.1); or plain, w_down(act(x w_up)), with tanh
    GELU (gelu), erf GELU (gelu_exact, BERT) or ReLU (relu, T5); with `model.bias`, each
    projection adds a bias.

    (B, T, D) -> (B, T, D), hidden width F = `d_ff` (default cfg.d_ff).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, d_ff: int | None = None):
        self.gated, self.activation = cfg.gated_mlp, ACTIVATIONS[cfg.mlp]
        d, f = cfg.d_model, d_ff or cfg.d_ff
        std, out_std = cfg.hidden_init_std, cfg.residual_init_std
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype, role="hidden")
        if self.gated:
            self.w_gate = param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype, role="hidden")
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), out_std, cfg.param_dtype, role="hidden")
        if cfg.bias:
            self.b_up = zero_bias(cfg, rngs, (f,), ("mlp",))
            if self.gated:
                self.b_gate = zero_bias(cfg, rngs, (f,), ("mlp",))
            self.b_down = zero_bias(cfg, rngs, (d,), ("embed",))

    def __call__(self, x):
        up = checkpoint_name(add_bias(self, "b_up", matmul(x, self.w_up[...])), "mlpwi")
        if self.gated:
            gate = checkpoint_name(add_bias(self, "b_gate", matmul(x, self.w_gate[...])), "mlpwi")
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(up)
        return checkpoint_name(add_bias(self, "b_down", matmul(hidden, self.w_down[...])), "mlpwo")


class Embed(nnx.Module):
    """Token embedding (V, D): lookup ids -> vectors (a tied output head reads the table too)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.input_init_std, cfg.param_dtype,
                           role="input")

    def __call__(self, ids, dtype):
        """ids (B, T) int -> (B, T, D) in `dtype`."""
        return take_rows(self.table[...], ids, dtype)
