"""How a layer reads its parameters: a plain array, an int8 `qwix.QArray` (a run written by
`lmjax quantize`, kept int8 in memory and dequantized where it is used) or a `LowRankWeight`
(a frozen weight with a LoRA adapter, applied without forming their sum).

`weight` casts any of them to the compute dtype, `take_rows` looks rows of a table up, and
`matmul` contracts activations with a weight; the model's layers read parameters only
through these.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import qwix


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "a", "b"], meta_fields=["scale"])
@dataclasses.dataclass(frozen=True)
class LowRankWeight:
    """A frozen weight W with a low-rank adapter (LoRA, `lmjax.lora`), read as W + scale A B
    without ever forming that sum: `matmul` and the MoE expert products compute
    x W + scale (x A) B, so a training step differentiates A and B alone and holds no
    weight-sized copy or gradient.

    base W (*stacked, *in, *out), a A (*stacked, *in, r), b B (*stacked, r, *out); the
    leading `stacked` axes (layers, experts) are one matrix each, so slicing every leaf along
    them (a layer scan, an expert gather) slices the adapted weight. It stands where a
    parameter's array stands (a `Param`'s value): `weight` casts its parts, `take_rows` looks
    rows up as W[ids] + scale A[ids] B, and `lmjax.lora.fold` forms W + scale A B (`folded`).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    def __getitem__(self, index):
        """`variable[...]`, how modules read a parameter, gives the weight itself."""
        if index is not Ellipsis:
            raise TypeError("a LowRankWeight is read whole (`[...]`); slice its leaves with jax.tree.map.")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def T(self) -> LowRankWeight:
        """A 2-D weight's transpose, W^T + scale B^T A^T (as `jax.Array.T`)."""
        return LowRankWeight(self.base.T, self.b.T, self.a.T, self.scale)

    def folded(self) -> jax.Array:
        """W + scale A B, summed in float32 and stored in W's dtype (so B = 0 gives W exactly)."""
        w, a, b = self.base, self.a, self.b
        outputs = w.ndim - a.ndim + 1
        lead = w.shape[:b.ndim - outputs - 1]
        rank = a.shape[-1]
        delta = jnp.matmul(a.reshape(*lead, -1, rank).astype(jnp.float32),
                           b.reshape(*lead, rank, -1).astype(jnp.float32))  # (*stacked, inputs, outputs)
        return (w.astype(jnp.float32) + self.scale * delta.reshape(w.shape)).astype(w.dtype)


def weight(w, dtype):
    """A parameter's value `w` in the compute `dtype`: an int8 `qwix.QArray` (a run written by
    `lmjax quantize`, int8 values times float32 scales) is dequantized here, where it is used, so
    the weights stay int8 in memory; a `LowRankWeight` keeps its form, each part read so; any
    other array is cast."""
    if isinstance(w, LowRankWeight):
        return LowRankWeight(weight(w.base, dtype), w.a.astype(dtype), w.b.astype(dtype), w.scale)
    return qwix.dequantize(w).astype(dtype) if isinstance(w, qwix.QArray) else w.astype(dtype)


def take_rows(table, ids, dtype):
    """Rows `ids` (int, any shape I) of `table` (R, ...) -> (*I, ...) in `dtype`. An int8
    `qwix.QArray` table gives up only the rows taken, with their scales (one per row, or one
    for the whole table). A `LowRankWeight` table (R, D) gives W[ids] + scale A[ids] B."""
    if isinstance(table, LowRankWeight):
        return take_rows(table.base, ids, dtype) + table.scale * matmul(take_rows(table.a, ids, dtype),
                                                                         table.b.astype(dtype))
    if not isinstance(table, qwix.QArray):
        return jnp.take(table, ids, axis=0).astype(dtype)
    scale = table.scale
    scale = jnp.take(scale, ids, axis=0) if scale.shape[0] > 1 else scale.reshape((1,) * ids.ndim + scale.shape[1:])
    return weight(qwix.QArray(jnp.take(table.qvalue, ids, axis=0), scale), dtype)


def matmul(x, w, n_in: int = 1, out_dtype=None):
    """Contract the last `n_in` axes of x with the first `n_in` axes of w, as a 2-D matmul.

    x (..., *in), w (*in, *out) -> (..., *out) in `out_dtype` (default x's dtype); w is
    read in x's dtype (`weight`); a `LowRankWeight` gives x W + scale (x A) B. Flattening
    x's leading axes into one keeps XLA's backward matmuls canonical (3-D einsums' weight
    gradients ran ~1.7x slower on CPU); w is contracted unreshaped, so the backward pass of a
    layer scan reads each layer's slice of the weights instead of saving a reshaped copy of
    them all.
    """
    if isinstance(w, LowRankWeight):
        low_rank = matmul(w.scale * matmul(x, w.a, n_in), w.b, out_dtype=out_dtype)
        return matmul(x, w.base, n_in, out_dtype) + low_rank
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    contract = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
    # lax.dot_general, not jnp.matmul: qwix's quantization-aware training intercepts dot_general and einsum
    flat = jax.lax.dot_general(x.reshape(-1, *inner), weight(w, x.dtype), (contract, ((), ())),
                               preferred_element_type=out_dtype)
    return flat.reshape(*lead, *w.shape[n_in:])
