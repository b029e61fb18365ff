"""The three model families, built from one shared embedding, block stack and head:

- DecoderLM: causal LM (GPT/LLaMA-style), with KV-cache decoding.
- EncoderLM: bidirectional encoder with a token head, for masked LM (BERT-style).
- EncoderDecoderLM: encoder + decoder with cross-attention, one token embedding shared by
  both stacks and the (optionally tied) output head (T5-style), with KV-cache decoding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.axis_rules import sequence_shards
from lmjax.config import ConfigError, ModelConfig
from lmjax.models.head import chunk_positions, chunked_token_losses, logits_bytes_per_position
from lmjax.models.kernels import AttentionMask, right_padding_lengths
from lmjax.models.layers import (
    ACTIVATIONS,
    Embed,
    RelativePositionBias,
    attention_mask,
    make_norm,
    param,
)
from lmjax.models.transformer import Stack, dropout
from lmjax.models.weights import matmul, take_rows
from lmjax.models.window import ring_step

_PACKED = "segment ids (packed documents need a segment mask)"


def check_length(cfg: ModelConfig, length: int, what: str) -> None:
    """ConfigError (one line) when `length` positions exceed what the model covers: model.max_seq_len,
    or the longer context a RoPE scaling declares (`ModelConfig.context_length`). Positions past it
    were never part of the model: a learned table has no row for them, RoPE was never trained there."""
    if length > cfg.context_length:
        raise ConfigError(f"{what} {length} positions is longer than the model's {cfg.context_length} "
                          f"(model.max_seq_len={cfg.max_seq_len}); split the input, or set a RoPE scaling "
                          "(model.rope_scaling) that extends the context.")


def _default_positions(tokens, positions):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions


class _TokenModel(nnx.Module):
    """Token (+ learned position, + token-type) embedding and the output head, shared by the
    families. BERT's pieces are config switches: `embed_norm` (a norm over the summed input
    embeddings), post-norm blocks (then no final norm) and `mlm_head_transform` (dense,
    activation and norm before the output, which adds a bias)."""

    def _init_embeddings(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("length", "embed"), cfg.input_init_std,
                                   cfg.param_dtype, role="input")
        if cfg.token_types:
            self.type_embed = param(rngs, (cfg.token_types, cfg.d_model), (None, "embed"), cfg.input_init_std,
                                    cfg.param_dtype, role="input")
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, rngs)

    def _init_head(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.norm_placement == "pre":
            self.final_norm = make_norm(cfg, rngs)
        if cfg.mlm_head_transform:
            self.head_dense = param(rngs, (cfg.d_model, cfg.d_model), ("embed", None), cfg.hidden_init_std,
                                    cfg.param_dtype, role="hidden")
            self.head_bias = param(rngs, (cfg.d_model,), (None,), 0, cfg.param_dtype, role="vector")
            self.head_norm = make_norm(cfg, rngs)
            self.output_bias = param(rngs, (cfg.vocab_size,), ("vocab",), 0, cfg.param_dtype, role="vector")
        if not cfg.tie_embeddings:
            self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.output_init_std,
                                 cfg.param_dtype, role="output")

    def _embed(self, tokens, positions, dropout_key, token_types=None):
        """Input vectors (B, T, D) of tokens, positions and token types (B, T) (default: type 0);
        ConfigError for inputs longer than the model (`check_length`)."""
        cfg = self.cfg
        check_length(cfg, tokens.shape[1], "an input of")
        dtype = jnp.dtype(cfg.dtype)
        x = self.embed(tokens, dtype)  # (B, T, D)
        if cfg.embedding_multiplier != 1.0:
            x = x * jnp.asarray(cfg.embedding_multiplier, dtype)
        if cfg.position == "learned":
            x = x + take_rows(self.pos_embed[...], positions, dtype)
        if cfg.token_types:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + take_rows(self.type_embed[...], types, dtype)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        return dropout(x, cfg.dropout, None if dropout_key is None else jax.random.split(dropout_key)[0])

    def _head_features(self, x):
        """Final hidden states (B, T, D) -> what the output projection reads (B, T, D): after the
        final norm (pre-norm models), BERT's MLM transform, and original T5's d_model**-0.5."""
        cfg = self.cfg
        if cfg.norm_placement == "pre":
            x = self.final_norm(x)
        if cfg.mlm_head_transform:
            x = ACTIVATIONS[cfg.mlp](matmul(x, self.head_dense[...]) + self.head_bias[...].astype(x.dtype))
            x = self.head_norm(x)
        if cfg.tie_embeddings and cfg.tied_output_rescale:  # original T5
            x = x * cfg.d_model**-0.5
        return x

    def _output_projection(self):
        """The function features (..., D) -> logits (..., V) float32: the output matrix (tied: the
        embedding table), times `logit_scale` (the logit multiplier, and 1 / m under µP), plus
        BERT's output bias. The weights are read here once, so a scan over chunks of positions
        closes over them."""
        cfg = self.cfg
        matrix = self.embed.table[...].T if cfg.tie_embeddings else self.unembed[...]
        bias = self.output_bias[...].astype(jnp.float32) if cfg.mlm_head_transform else None
        multiplier = cfg.logit_scale if cfg.parametrization == "mup" or cfg.logit_multiplier != 1.0 else None

        def project(features):
            logits = matmul(features, matrix, out_dtype=jnp.float32)
            logits = logits if multiplier is None else logits * multiplier
            return logits if bias is None else logits + bias

        return project

    def _head(self, x, targets=None, loss_mask=None):
        """Final hidden states (B, T, D) -> logits (B, T, V) float32; or, given targets (B, T) int,
        their cross-entropy (B, T) float32 (nats; 0 where loss_mask (B, T), default ones, is 0),
        `model.loss_chunk` positions at a time (`lmjax.models.head`): the logits of the whole
        batch never exist, in the forward or the backward pass."""
        features, project = self._head_features(x), self._output_projection()
        if targets is None:
            return project(features)
        loss_mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask
        rows, length = targets.shape
        chunk = chunk_positions(self.cfg.loss_chunk, length, logits_bytes_per_position(rows, self.cfg.vocab_size))
        return chunked_token_losses(features, targets, loss_mask, project, chunk)


class _SingleStackLM(_TokenModel):
    """Embedding -> scanned pre-norm blocks -> norm -> logits, causal or bidirectional.

    `__call__(tokens, positions, segment_ids, token_types=None) -> logits (B, T, V) float32`,
    where tokens, positions, segment_ids and token_types are (B, T) int arrays; given `targets`
    (and `loss_mask`) (B, T), the per-token losses (B, T) instead (`_TokenModel._head`). Tokens attend only within their
    segment (packed documents); segment id 0 marks padding. Without segment ids each row is one
    sequence, which fused attention kernels can take without a mask.
    """

    causal: bool

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._init_embeddings(cfg, rngs)
        if cfg.position == "relative":
            self.relative_bias = RelativePositionBias(cfg, bidirectional=not self.causal, rngs=rngs)
        self.stack = Stack(cfg, rngs=rngs)
        self._init_head(cfg, rngs)

    def __call__(self, tokens, positions=None, segment_ids=None, dropout_key=None, token_types=None, targets=None,
                 loss_mask=None):
        positions = _default_positions(tokens, positions)
        packed = segment_ids is not None
        if not packed:
            segment_ids = jnp.ones_like(tokens)
        embed_key, stack_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = self._embed(tokens, positions, embed_key, token_types)
        # causal by position where positions order every real token: packed rows, and a sequence split over
        # devices (load-balanced order); else by index (right-padded rows may put padding at position 0)
        by_position = packed or sequence_shards() > 1
        mask, bias = self.attention_inputs(positions, segment_ids, by_position)
        mask = AttentionMask(mask, causal=self.causal, not_fusable=_PACKED if packed else None)
        x = self.stack(x, positions, mask, stack_key, bias=bias, segment_ids=segment_ids)
        return self._head(x, targets, loss_mask)

    def attention_inputs(self, positions, segment_ids, by_position: bool = False):
        """The stack's attention mask (B, 1, T, T) bool (causal or not; `by_position`: causal by
        positions, else by index, see `attention_mask`) and relative position bias (B, N, T, T)
        float32, None unless `position` is relative; positions, segment_ids (B, T)."""
        bias = self.relative_bias(positions, positions) if self.cfg.position == "relative" else None
        return attention_mask(segment_ids, self.causal, positions if by_position else None), bias


class DecoderLM(_SingleStackLM):
    """Causal transformer LM (GPT/LLaMA-style); see `_SingleStackLM`, plus KV-cache decoding."""

    causal = True

    def init_cache(self, batch_size: int, length: int):
        """An empty KV cache for decoding up to `length` positions, in the compute dtype:
        {"full": (keys, values)} of the layers that attend over the whole context, each
        (L_full, B, length, K, H), and with `model.sliding_window` W, {"window": (keys, values)}
        ring buffers of R = min(W, length) slots, each (L_window, B, R, K, H), and
        "window_positions" (B, R) int32, the position each slot holds (-1: none yet)."""
        cfg = self.cfg
        check_length(cfg, length, "a KV cache of")
        n_window = sum(cfg.attention_window(i) is not None for i in range(cfg.n_layers))
        cache = {}
        if n_window < cfg.n_layers:
            cache["full"] = _empty_cache(cfg, cfg.n_layers - n_window, batch_size, length)
        if n_window:
            slots = min(cfg.sliding_window, length)
            cache["window"] = _empty_cache(cfg, n_window, batch_size, slots)
            cache["window_positions"] = jnp.full((batch_size, slots), -1, jnp.int32)
        return cache

    def decode(self, tokens, positions, cache, segment_ids=None):
        """Run tokens (B, T) at absolute positions (B, T) against a KV cache (`init_cache`); returns
        (logits (B, T, V) float32, updated cache). A query at position p attends to the cache slots
        0..p of its row, which must hold that row's earlier tokens, or in a sliding-window layer to
        the positions p - W < k <= p. Tokens whose `segment_ids` (B, T) is 0 (padding) are not kept
        in the ring buffers of sliding-window layers."""
        stack_cache = {kind: cache[kind] for kind in ("full", "window") if kind in cache}
        mask = bias = window_mask = ring_write = None
        if "full" in cache:
            mask, bias = self._cache_mask_and_bias(positions, cache["full"])
        if "window" in cache:
            valid = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
            window_mask, ring_write, slot_positions = ring_step(cache["window_positions"], positions, valid,
                                                                self.cfg.sliding_window)
        x, stack_cache = self.stack(self._embed(tokens, positions, None), positions, mask, cache=stack_cache,
                                    bias=bias, window_mask=window_mask, ring_write=ring_write)
        if "window" in cache:
            stack_cache["window_positions"] = slot_positions
        return self._head(x), stack_cache

    def _cache_mask_and_bias(self, positions, cache):
        mask = _cache_mask(positions, cache[0].shape[2])
        bias = None
        if self.cfg.position == "relative":
            slots = jnp.arange(cache["full"][0].shape[2])
            bias = self.relative_bias(positions, jnp.broadcast_to(slots, (positions.shape[0], len(slots))))
        return mask, bias


class EncoderLM(_SingleStackLM):
    """Bidirectional transformer with a token head (BERT-style masked LM); see `_SingleStackLM`.
    Every token sees every non-padding token of its segment, before and after it."""

    causal = False


def _cache_mask(positions, n_slots: int) -> AttentionMask:
    """Queries at positions (B, T) see the cache slots 0..position of their row."""
    dense = (jnp.arange(n_slots)[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
    return AttentionMask(dense, not_fusable="KV-cache decoding (a mask by position over the cache)")


def _empty_cache(cfg: ModelConfig, n_layers: int, batch_size: int, length: int):
    shape = (n_layers, batch_size, length, cfg.kv_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)


def cross_attention_mask(decoder_segment_ids, encoder_segment_ids, packed: bool = False) -> AttentionMask:
    """Decoder token t may look at encoder token s of its own segment (document), padding (id 0)
    excluded; (B, 1, T, S) densely, and, unless rows are `packed` with several documents, as the
    right-padded lengths of both."""
    same = decoder_segment_ids[:, :, None] == encoder_segment_ids[:, None, :]
    dense = (same & (decoder_segment_ids != 0)[:, :, None])[:, None]
    if packed:
        return AttentionMask(dense, not_fusable=_PACKED)
    return AttentionMask(dense, query_lengths=right_padding_lengths(decoder_segment_ids),
                         key_lengths=right_padding_lengths(encoder_segment_ids))


def padded_mask(dense, segment_ids, causal: bool, packed: bool = False) -> AttentionMask:
    """The self-attention mask `dense` (B, 1, T, T) of right-padded rows (segment ids (B, T): 1 on
    tokens, 0 on padding), with the rows' lengths for fused kernels; of `packed` rows (segment ids
    1, 2, ... per document), the dense mask alone."""
    if packed:
        return AttentionMask(dense, causal=causal, not_fusable=_PACKED)
    lengths = right_padding_lengths(segment_ids)
    return AttentionMask(dense, causal=causal, query_lengths=lengths, key_lengths=lengths)


class EncoderDecoderLM(_TokenModel):
    """T5-style encoder-decoder: a bidirectional encoder of `n_layers` blocks over the inputs,
    and a causal decoder of `n_decoder_layers` blocks that also cross-attends to the encoder
    output. One token embedding serves both stacks (and the output head when tied).

    `__call__(encoder_tokens (B, S), decoder_tokens (B, T), encoder_segment_ids, decoder_segment_ids)
    -> logits (B, T, V) float32` (given `targets` and `loss_mask` (B, T), the per-token losses
    (B, T) instead, as `_TokenModel._head`); segment ids mark right padding: 1 on each row's tokens,
    then 0 on its padding (default: none), as span-corruption batches and `generate` build them. So
    each row is one sequence of known length, which fused attention kernels take without a mask.
    Given `encoder_positions` (B, S) and `decoder_positions` (B, T), rows may instead pack several
    documents (T5X's packing): segment ids 1, 2, ... per document on both sides, positions
    restarting at each; every token then attends, and cross-attends, within its own document.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._init_embeddings(cfg, rngs)
        # the decoder stack is causal: its MoE layers always route by token choice
        decoder_cfg = dataclasses.replace(cfg, n_layers=cfg.decoder_layers, n_decoder_layers=None, family="decoder",
                                          moe=dataclasses.replace(cfg.moe, routing="tokens_choose"))
        if cfg.position == "relative":
            self.encoder_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
            self.decoder_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.encoder = Stack(cfg, rngs=rngs)
        self.encoder_norm = make_norm(cfg, rngs)
        self.decoder = Stack(decoder_cfg, rngs=rngs, cross=True)
        self._init_head(cfg, rngs)

    def encode(self, tokens, segment_ids=None, dropout_key=None, positions=None):
        """Encoder output (B, S, D) of tokens (B, S); padding (segment 0) is attended by nobody.
        Given positions (B, S), rows may pack several documents (see `__call__`)."""
        packed = positions is not None
        segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        positions = _default_positions(tokens, positions)
        embed_key, stack_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = self._embed(tokens, positions, embed_key)
        mask, bias = self.encoder_attention_inputs(positions, segment_ids)
        x = self.encoder(x, positions, padded_mask(mask, segment_ids, False, packed), stack_key, bias=bias,
                         segment_ids=segment_ids)
        return self.encoder_norm(x)

    def encoder_attention_inputs(self, positions, segment_ids):
        """The encoder's bidirectional mask (B, 1, S, S) and relative bias (B, N, S, S) or None."""
        bias = self.encoder_bias(positions, positions) if self.cfg.position == "relative" else None
        return attention_mask(segment_ids, causal=False), bias

    def decoder_attention_inputs(self, positions, segment_ids, by_position: bool = False):
        """The decoder's causal self-attention mask (B, 1, T, T) (`by_position`: causal by positions,
        else by index, see `attention_mask`) and relative bias (B, N, T, T) or None."""
        bias = self.decoder_bias(positions, positions) if self.cfg.position == "relative" else None
        return attention_mask(segment_ids, True, positions if by_position else None), bias

    def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None, decoder_segment_ids=None,
                 dropout_key=None, targets=None, loss_mask=None, encoder_positions=None, decoder_positions=None):
        if sequence_shards() > 1 and (encoder_positions is None or decoder_positions is None):
            raise ConfigError("a sequence split over devices (context parallelism) is reordered: pass "
                             "encoder_positions and decoder_positions.")
        encoder_segment_ids = jnp.ones_like(encoder_tokens) if encoder_segment_ids is None else encoder_segment_ids
        decoder_segment_ids = jnp.ones_like(decoder_tokens) if decoder_segment_ids is None else decoder_segment_ids
        encoder_key, embed_key, stack_key = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        encoded = self.encode(encoder_tokens, encoder_segment_ids, encoder_key, encoder_positions)
        packed = decoder_positions is not None
        positions = _default_positions(decoder_tokens, decoder_positions)
        x = self._embed(decoder_tokens, positions, embed_key)
        mask, bias = self.decoder_attention_inputs(positions, decoder_segment_ids, sequence_shards() > 1)
        context_mask = cross_attention_mask(decoder_segment_ids, encoder_segment_ids,
                                            packed or encoder_positions is not None)
        x = self.decoder(x, positions, padded_mask(mask, decoder_segment_ids, True, packed), stack_key, bias=bias,
                         context=encoded, context_mask=context_mask, segment_ids=decoder_segment_ids)
        return self._head(x, targets, loss_mask)

    def init_cache(self, batch_size: int, length: int, encoded):
        """The decoder's KV cache for decoding against `encoded` (B, S, D) (from `encode`):
        {"full": (keys, values, cross_keys, cross_values)}: keys and values of `length` empty slots,
        each (L_dec, B, length, K, H), and the cross-attention keys and values of the encoder output,
        each (L_dec, B, S, K, H), computed here once instead of at every decoding step. All in the
        compute dtype."""
        check_length(self.cfg, length, "a KV cache of")
        keys, values = _empty_cache(self.cfg, self.cfg.decoder_layers, batch_size, length)
        cross = [self.decoder.layer(i).cross_attn.keys_values(encoded) for i in range(self.cfg.decoder_layers)]
        cross_keys, cross_values = (jnp.stack([kv[j] for kv in cross]).astype(keys.dtype) for j in (0, 1))
        return {"full": (keys, values, cross_keys, cross_values)}

    def decode(self, tokens, positions, cache, encoder_segment_ids):
        """Run decoder tokens (B, T) at positions (B, T) against the decoder's KV cache (from
        `init_cache`, which holds the encoder output's cross-attention keys and values) and
        return (logits (B, T, V) float32, updated cache). Queries at position p see cache slots
        0..p, and every encoder position whose `encoder_segment_ids` (B, S) is not 0."""
        slots = jnp.arange(cache["full"][0].shape[2])
        mask = _cache_mask(positions, len(slots))
        bias = None
        if self.cfg.position == "relative":
            bias = self.decoder_bias(positions, jnp.broadcast_to(slots, (positions.shape[0], len(slots))))
        context_mask = cross_attention_mask(jnp.ones_like(tokens), encoder_segment_ids)
        x, cache = self.decoder(self._embed(tokens, positions, None), positions, mask, cache=cache, bias=bias,
                                context_mask=context_mask)
        return self._head(x), cache
