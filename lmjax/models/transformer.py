"""The pre-norm transformer block and the stack of blocks (scanned or unrolled).

The stack keeps every layer's weights in one array per parameter with a leading
`layers` axis (L, ...), so scanned and unrolled execution share one checkpoint layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.axis_rules import PipelineLayout, constrain, pipeline_layout
from lmjax.config import ModelConfig
from lmjax.models.kernels import AttentionMask
from lmjax.models.layers import MLP, Attention, make_norm
from lmjax.models.moe import PER_TOKEN_STATISTICS, SUMMED_STATISTICS, MoE
from lmjax.models.pipeline import circular_stages, run_pipeline
from lmjax.models.window import windowed

_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
_SAVE = jax.checkpoint_policies.save_only_these_names
# What each layer keeps for the backward pass (the rest is recomputed), by the names that
# `layers.Attention` and `layers.MLP` give their outputs; MaxText's policies of the same names.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # the layer input only
    "dots": _DOTS,  # every matmul output without batch dimensions (MaxText's "minimal")
    "minimal_with_context": jax.checkpoint_policies.save_from_both_policies(_DOTS, _SAVE("context")),
    "save_dot_except_mlp": _SAVE("query_proj", "key_proj", "value_proj", "context", "out_proj"),
    "save_qkv_proj": _SAVE("query_proj", "key_proj", "value_proj"),
    "save_out_proj": _SAVE("out_proj"),
}


def dropout(x, rate: float, key):
    """Inverted dropout of x with probability `rate`; identity when key is None."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _mask_arrays(mask) -> dict:
    """The arrays of an attention mask (an AttentionMask's array fields, or a bare array), which
    are per row (B, ...) and so are cut into microbatches with the activations."""
    if not isinstance(mask, AttentionMask):
        return {"dense": mask}
    return {f.name: getattr(mask, f.name) for f in dataclasses.fields(mask) if isinstance(getattr(mask, f.name),
                                                                                        jax.Array)}


def _with_arrays(mask, arrays: dict):
    """`mask` with its arrays replaced by `arrays` (one microbatch's, from `_mask_arrays`)."""
    return dataclasses.replace(mask, **arrays) if isinstance(mask, AttentionMask) else arrays["dense"]


class Block(nnx.Module):
    """x + Attn(Norm(x)), with `cross` then x + CrossAttn(Norm(x), context), then
    x + FFN(Norm(x)), the FFN a dense MLP or, with `moe`, a mixture of experts; with
    `model.norm_placement` "post" (BERT), each step is x = Norm(x + f(x)) instead.
    (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False, cross: bool = False):
        self.dropout_rate, self.post_norm = cfg.dropout, cfg.norm_placement == "post"
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = make_norm(cfg, rngs)
            self.cross_attn = Attention(cfg, rngs=rngs, cross=True)
        self.mlp_norm = make_norm(cfg, rngs)
        if moe:
            self.moe = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, dropout_key=None, cache=None, bias=None, context=None, context_mask=None,
                 segment_ids=None, ring_write=None):
        """mask (B, 1, T, S) and bias (B, N, T, S) or None for self-attention; segment_ids (B, T)
        (0: padding, which a MoE layer routes nowhere under expert choice) or None; with `cross`,
        context (B, S', D) the encoder output and context_mask (B, 1, T, S') where queries may
        look. With a KV `cache` (see Attention) returns (x, updated cache); a cross-attending
        block's cache is (keys, values, cross_keys, cross_values), the last two (B, S', K, H)
        computed from the encoder output once (`EncoderDecoderLM.init_cache`), read, never written.
        With `ring_write` the cache is a sliding-window ring buffer (`Attention`)."""
        moe, cross = hasattr(self, "moe"), hasattr(self, "cross_attn")
        n_keys = (3 if moe else 2) + cross
        keys = (None,) * n_keys if dropout_key is None else jax.random.split(dropout_key, n_keys)
        cross_cache = ()
        if cross and cache is not None:
            cache, cross_cache = cache[:2], cache[2:]
            context = cross_cache
        pre = (lambda norm, h: h) if self.post_norm else (lambda norm, h: norm(h))  # noqa: E731
        post = (lambda norm, h: norm(h)) if self.post_norm else (lambda norm, h: h)  # noqa: E731
        attended = self.attn(pre(self.attn_norm, x), positions, mask, cache, bias, ring_write=ring_write)
        if cache is not None:
            attended, cache = attended
        x = post(self.attn_norm, x + dropout(attended, self.dropout_rate, keys[0]))
        if cross:
            attended = self.cross_attn(pre(self.cross_norm, x), positions, context_mask, context=context)
            x = post(self.cross_norm, x + dropout(attended, self.dropout_rate, keys[-1]))
        h = pre(self.mlp_norm, x)
        h = self.moe(h, keys[2], segment_ids) if moe else self.mlp(h)
        x = post(self.mlp_norm, x + dropout(h, self.dropout_rate, keys[1]))
        return x if cache is None else (x, (*cache, *cross_cache))


class Stack(nnx.Module):
    """`n_layers` blocks with stacked weights (leading logical axis `layers`).

    With MoE every `every`-th layer, the stack is `n_layers / every` repeats of a period
    of `every - 1` dense blocks then one MoE block: `blocks` holds the dense ones (in layer
    order) and `moe_blocks` the MoE ones; with every == 1 all of `blocks` are of one kind.
    The scan steps over cycles of lcm(moe.every, global_every) blocks (`cycle`), so that which
    block is MoE and which attends through a sliding window is fixed within the one compiled body;
    windows change no weights, so the checkpoint layout is the same with or without them.
    A forward pass without a cache keeps the MoE layers' routing statistics as the
    `nnx.Intermediate` "routing", each statistic stacked over MoE layers (L_moe, ...), and
    the root-mean-square of every block's output as "activation_rms" (L,) float32 (the µP
    coordinate check reads it; unused, the compiler drops it).
    With `cross`, every block also cross-attends to a context (an encoder's output).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        self.cfg = cfg
        self.period = cfg.moe.every if cfg.moe.enabled else 1

        def stacked_blocks(count: int, moe: bool):
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs, moe=moe, cross=cross)

            return make_blocks(rngs)

        if self.period == 1:
            self.blocks = stacked_blocks(cfg.n_layers, cfg.moe.enabled)
        else:
            repeats = cfg.n_layers // self.period
            self.blocks = stacked_blocks(repeats * (self.period - 1), False)
            self.moe_blocks = stacked_blocks(repeats, True)

    def layer(self, index: int) -> Block:
        """Block `index` (0-based, in execution order) as a module of its own (a copy)."""
        period = self.period
        repeat, offset = divmod(index, period)
        if period > 1 and offset == period - 1:
            blocks, i = self.moe_blocks, repeat
        else:
            blocks, i = self.blocks, repeat * (period - 1) + offset if period > 1 else index
        graphdef, weights = nnx.split(blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda w: w[i], weights))

    def cycle(self) -> list[tuple[str, int, int | None]]:
        """The layers of one scanned step, a cycle of lcm(moe.every, global_every) blocks, as
        (weights: "blocks" or "moe_blocks", index among the cycle's blocks of those weights,
        attention window or None)."""
        cfg, period = self.cfg, self.period
        layers, seen = [], {"blocks": 0, "moe_blocks": 0}
        for j in range(cfg.layer_cycle):
            group = "moe_blocks" if period > 1 and (j + 1) % period == 0 else "blocks"
            layers.append((group, seen[group], cfg.attention_window(j)))
            seen[group] += 1
        return layers

    def __call__(self, x, positions, mask, dropout_key=None, cache=None, bias=None, context=None, context_mask=None,
                 segment_ids=None, window_mask=None, ring_write=None):
        """x (B, T, D), positions (B, T), mask (B, 1, T, S) -> (B, T, D); bias, context,
        context_mask and segment_ids as in `Block`, the same for every layer. Sliding-window layers
        (`model.sliding_window`) attend with `window_mask` (default: `mask` limited to the window by
        `positions`) and, while decoding, write their ring buffers by `ring_write` (`models.window`).

        With `cache` = {"full": (keys, values), "window": (keys, values)}, each (L_kind, B, S_kind, K,
        H) for the layers of that kind (global, sliding-window), returns (x, updated cache); a
        cross-attending stack's "full" entry also holds (cross_keys, cross_values) (see `Block`).
        """
        layout = pipeline_layout() if cache is None else None
        if layout is not None and x.shape[0] % layout.microbatches == 0:
            return self._pipelined(layout, x, positions, mask, dropout_key, bias, segment_ids, window_mask, context,
                                   context_mask)
        cfg, cycle = self.cfg, self.cycle()
        repeats = cfg.n_layers // len(cycle)
        groups = {name: nnx.split(getattr(self, name)) for name in ("blocks", "moe_blocks") if hasattr(self, name)}
        graphdefs = {name: graphdef for name, (graphdef, _) in groups.items()}

        def per_repeat(a):  # (L_kind, ...) -> (repeats, L_kind / repeats, ...)
            return a.reshape(repeats, a.shape[0] // repeats, *a.shape[1:])

        weights = {name: jax.tree.map(per_repeat, w) for name, (_, w) in groups.items()}
        layer_keys = None if dropout_key is None else per_repeat(jax.random.split(dropout_key, cfg.n_layers))
        repeat_cache = None if cache is None else jax.tree.map(per_repeat, cache)
        masks = {None: mask}
        for window in {w for _, _, w in cycle if w is not None}:
            masks[window] = windowed(mask, positions, window) if window_mask is None else window_mask

        apply_layer = self._cycle_step(cycle, graphdefs, positions, masks, bias, context, context_mask, segment_ids,
                                       ring_write)
        if cfg.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        unroll = cfg.scan_unroll if cfg.scan_layers else True
        x, (cache, stats, rms) = jax.lax.scan(apply_layer, x, (weights, layer_keys, repeat_cache), unroll=unroll)

        def per_layer(a):  # (repeats, n, ...) -> (repeats * n, ...)
            return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])

        if cache is None:  # not while decoding: a cache update is not a forward pass
            self.activation_rms = nnx.Intermediate(rms.reshape(cfg.n_layers))
            if cfg.moe.enabled:
                self.routing = nnx.Intermediate(jax.tree.map(per_layer, nnx.to_pure_dict(stats)["moe"]["routing"]))
            return x
        return x, jax.tree.map(per_layer, cache)

    def _pipelined(self, layout: PipelineLayout, x, positions, mask, dropout_key, bias, segment_ids, window_mask,
                   context, context_mask):
        """`__call__` without a cache, its layers run in `layout.stages` stages, `layout.repeats` times
        round, on microbatches (`lmjax.models.pipeline.run_pipeline`): with one repeat stage s runs
        layers [s L/P, (s+1) L/P), as the stacked weights are sharded. Each microbatch's dropout
        keys are the step's folded with its index; a cross-attending stack's context and its mask
        are cut into microbatches with the activations."""
        cfg, cycle = self.cfg, self.cycle()
        stages, repeats = layout.stages, layout.repeats
        cycles_per_chunk = cfg.n_layers // (len(cycle) * stages * repeats)
        groups = {name: nnx.split(getattr(self, name)) for name in ("blocks", "moe_blocks") if hasattr(self, name)}
        graphdefs = {name: graphdef for name, (graphdef, _) in groups.items()}
        weights = {name: jax.tree.map(lambda w: circular_stages(w, stages, repeats), state)
                   for name, (_, state) in groups.items()}
        masks = {None: mask}
        for window in {w for _, _, w in cycle if w is not None}:
            masks[window] = windowed(mask, positions, window) if window_mask is None else window_mask
        side = {"positions": positions, "bias": bias, "segment_ids": segment_ids, "context": context,
                "context_mask": None if context_mask is None else _mask_arrays(context_mask),
                "masks": {str(w): _mask_arrays(m) for w, m in masks.items()}}  # str: None and ints do not sort

        def per_cycle(a):  # (n, ...) -> (cycles per chunk, n / cycles per chunk, ...)
            return a.reshape(cycles_per_chunk, a.shape[0] // cycles_per_chunk, *a.shape[1:])

        def stage(chunk_weights, h, side, microbatch, stage, repeat):
            keys = None
            if dropout_key is not None:
                keys = jax.random.split(jax.random.fold_in(dropout_key, microbatch), cfg.n_layers)
                keys = per_cycle(keys.reshape(repeats, stages, -1)[repeat, stage])
            stage_masks = {w: _with_arrays(masks[w], side["masks"][str(w)]) for w in masks}
            stage_context_mask = None if context_mask is None else _with_arrays(context_mask, side["context_mask"])
            step = self._cycle_step(cycle, graphdefs, side["positions"], stage_masks, side["bias"], side["context"],
                                    stage_context_mask, side["segment_ids"], None)
            if cfg.remat != "none":
                step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
            h, (_, stats, rms) = jax.lax.scan(step, h, (jax.tree.map(per_cycle, chunk_weights), keys, None),
                                              unroll=cfg.scan_unroll if cfg.scan_layers else True)
            routing = None if stats is None else nnx.to_pure_dict(stats)["moe"]["routing"]
            routing = routing and {k: v for k, v in routing.items() if k not in PER_TOKEN_STATISTICS}
            return h, {"rms_squared": jnp.square(rms), "routing": routing}

        x, aux = run_pipeline(stage, weights, x, side, stages, layout.microbatches, repeats, layout.stage_axes)
        rms = jnp.sqrt(jnp.swapaxes(aux["rms_squared"], 0, 1) / layout.microbatches)  # (R, P, ...): layer order
        self.activation_rms = nnx.Intermediate(rms.reshape(cfg.n_layers))
        if aux["routing"]:  # (P, R, chunk cycles, MoE blocks per cycle, ...) -> (L_moe, ...), over microbatches
            self.routing = nnx.Intermediate({
                name: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[4:]) / (
                    1 if name in SUMMED_STATISTICS else layout.microbatches) for name, a in aux["routing"].items()})
        return x

    def _cycle_step(self, cycle, graphdefs, positions, masks, bias, context, context_mask, segment_ids, ring_write):
        """The scan body: one cycle of blocks, (h, (weights, dropout keys, cache) of one repeat) ->
        (h, (updated cache, the MoE layers' routing statistics, each block's output RMS))."""
        cfg = self.cfg

        def apply_layer(h, layer):
            layer_weights, keys, layer_cache = layer
            moe_stats, rms = [], []
            new_cache = {kind: [] for kind in layer_cache or {}}
            for j, (group, index, window) in enumerate(cycle):
                block = nnx.merge(graphdefs[group], jax.tree.map(lambda w, i=index: w[i], layer_weights[group]))
                kind = "full" if window is None else "window"
                cache_j = None
                if layer_cache is not None:
                    cache_j = jax.tree.map(lambda c, i=len(new_cache[kind]): c[i], layer_cache[kind])
                out = block(h, positions, masks[window], None if keys is None else keys[j], cache_j, bias, context,
                            context_mask, segment_ids, ring_write=None if window is None else ring_write)
                h = constrain(out[0] if cache_j is not None else out, ("batch", "activation_length", None))
                if cache_j is not None:
                    new_cache[kind].append(out[1])
                if cfg.moe.enabled and (group == "moe_blocks" or self.period == 1):
                    moe_stats.append(nnx.pop(block, nnx.Intermediate))
                rms.append(jnp.sqrt(jnp.mean(jnp.square(h.astype(jnp.float32)))))
            new_cache = {kind: jax.tree.map(lambda *c: jnp.stack(c), *caches) for kind, caches in new_cache.items()}
            stats = jax.tree.map(lambda *s: jnp.stack(s), *moe_stats) if moe_stats else None
            return h, (new_cache if layer_cache is not None else None, stats, jnp.stack(rms))

        return apply_layer
