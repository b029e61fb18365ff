"""Looking inside a trained model: attention probabilities, expert routing, parameter tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.models.lm import EncoderDecoderLM, cross_attention_mask
from lmjax.models.window import windowed


def attention_maps(model, tokens, decoder_tokens=None):
    """The attention probabilities of every layer and head for one sequence of token ids,
    as the forward pass computes them (`Attention.probabilities`, with the model's own masks,
    positions and relative position bias).

    DecoderLM / EncoderLM: tokens (T,) -> (L, N, T, T) float32; row t is how query t spreads
    over the keys (0..t for the causal decoder, all T for the encoder).
    EncoderDecoderLM: encoder tokens (S,) and `decoder_tokens` (T,) -> {"encoder": (L, N, S, S),
    "decoder": (L_dec, N, T, T) self-attention, "cross": (L_dec, N, T, S) over the encoder output}.
    """
    tokens = jnp.asarray(tokens, jnp.int32)[None]  # (1, S)
    positions = jnp.arange(tokens.shape[1])[None]
    if not isinstance(model, EncoderDecoderLM):
        mask, bias = model.attention_inputs(positions, jnp.ones_like(tokens))
        return _stack_maps(model.stack, model._embed(tokens, positions, None), positions, mask, bias)[0]
    if decoder_tokens is None:
        raise ValueError("attention_maps of an encoder-decoder needs decoder_tokens as well as the encoder tokens.")
    mask, bias = model.encoder_attention_inputs(positions, jnp.ones_like(tokens))
    encoder_maps = _stack_maps(model.encoder, model._embed(tokens, positions, None), positions, mask, bias)[0]
    decoder_tokens = jnp.asarray(decoder_tokens, jnp.int32)[None]  # (1, T)
    decoder_positions = jnp.arange(decoder_tokens.shape[1])[None]
    mask, bias = model.decoder_attention_inputs(decoder_positions, jnp.ones_like(decoder_tokens))
    decoder_maps, cross_maps = _stack_maps(
        model.decoder, model._embed(decoder_tokens, decoder_positions, None), decoder_positions, mask, bias,
        context=model.encode(tokens), context_mask=cross_attention_mask(jnp.ones_like(decoder_tokens),
                                                                        jnp.ones_like(tokens)))
    return {"encoder": encoder_maps, "decoder": decoder_maps, "cross": cross_maps}


def _stack_maps(stack, x, positions, mask, bias, context=None, context_mask=None):
    """Run x (1, T, D) through `stack` layer by layer (as `Block`, without dropout) and return
    the self-attention maps (L, N, T, S) and, with a context, the cross-attention maps, as numpy.
    Sliding-window layers (`model.sliding_window`) attend within their window, as in the stack."""
    self_maps, cross_maps = [], []
    for i in range(stack.cfg.n_layers):
        block, window = stack.layer(i), stack.cfg.attention_window(i)
        layer_mask = mask if window is None else windowed(mask, positions, window)
        self_maps.append(block.attn.probabilities(block.attn_norm(x), positions, layer_mask, bias)[0])
        if context is not None:
            attended = x + block.attn(block.attn_norm(x), positions, layer_mask, bias=bias)
            cross_maps.append(block.cross_attn.probabilities(block.cross_norm(attended), positions, context_mask,
                                                             context=context)[0])
        x = block(x, positions, layer_mask, bias=bias, context=context, context_mask=context_mask)
    return np.asarray(jnp.stack(self_maps)), np.asarray(jnp.stack(cross_maps)) if cross_maps else None


def routing_assignments(model, tokens) -> dict:
    """How a MoE model routes one sequence of token ids, at evaluation settings.

    Returns {"experts": (L_moe, T, k) int expert ids, best first (token choice), or "picked":
    (L_moe, T, E) 1 where expert e picked the token (expert choice); "load": (L_moe, E) share
    of the assignments each expert got; "moe_layers": the MoE layers' indices}.
    """
    from lmjax.models.moe import pop_routing_statistics

    cfg = model.cfg
    if not cfg.moe.enabled:
        raise ValueError("routing_assignments needs a mixture-of-experts model (model.moe.n_experts > 0).")
    model.eval()
    model(jnp.asarray(tokens, jnp.int32)[None])
    stats = pop_routing_statistics(model)
    per_token = "experts" if "experts" in stats else "picked"
    return {per_token: np.asarray(stats[per_token][:, 0]), "load": np.asarray(stats["load"]),
            "moe_layers": [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]}


def parameter_table(model) -> list[dict]:
    """One row per parameter: path, shape, logical axes, count."""
    rows = []
    for path, variable in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                              is_leaf=lambda x: isinstance(x, nnx.Variable)):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        rows.append({"parameter": name, "shape": tuple(variable.shape), "axes": tuple(variable.out_sharding or ()),
                     "count": int(np.prod(variable.shape))})
    return rows
