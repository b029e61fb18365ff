"""How a layer reads its parameters: a plain array, or a `WeightForm`, a value some feature
keeps in another form (`lmjax quantize`'s int8 values and scales, `lmjax.adapters.lora`'s frozen weight
with a low-rank adapter beside it).

`weight` casts any of them to the compute dtype, `take_rows` looks rows of a table up, and
`matmul` contracts activations with a weight; the model's layers read parameters only
through these, and the MoE layer's expert products through `FactoredWeight`. The forms live
with their features; this module knows only the protocols.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from lmjax.axis_rules import sequence_shards


@runtime_checkable
class WeightForm(Protocol):
    """A parameter value that is not a plain array; it stands where a `Param`'s array stands
    (`variable[...]` gives it whole) and is a pytree whose leaves slice along leading stacked
    axes (layers, experts) like the weight's.

    `read(dtype)` is the weight in the compute `dtype`: an array (the int8 form dequantizes
    here, where it is used, so it stays int8 in memory), or a `FactoredWeight` that applies its
    own products. `take_rows(ids, dtype)` is rows `ids` (int, any shape I) of a table (R, ...)
    -> (*I, ...) in `dtype`, reading only those rows.
    """

    shape: tuple[int, ...]

    def read(self, dtype) -> jax.Array | FactoredWeight: ...

    def take_rows(self, ids, dtype) -> jax.Array: ...


@runtime_checkable
class FactoredWeight(WeightForm, Protocol):
    """A weight the model never forms densely: it computes the products that read it.

    `matmul(x, n_in, out_dtype)` as `matmul` below; `expert_matmul(equation, x)` as
    jnp.einsum(equation, x, w) in x's dtype for expert weights (E', in, out) named by the
    equation's second operand; `ragged_dot(x, group_sizes)` as `jax.lax.ragged_dot` of sorted
    rows x (M, in) with expert weights (E, in, out); `leaf_axes(axes)` the logical axes of its
    leaves, in its own pytree shape, given the weight's `axes`. Dense products inside them go
    through `matmul` (its `lax.dot_general` is what qwix's QAT intercepts) or jnp.einsum.
    """

    def matmul(self, x, n_in: int, out_dtype) -> jax.Array: ...

    def expert_matmul(self, equation: str, x) -> jax.Array: ...

    def ragged_dot(self, x, group_sizes) -> jax.Array: ...

    def leaf_axes(self, axes: tuple): ...


def weight(w, dtype):
    """A parameter's value `w` (an array or a `WeightForm`) in the compute `dtype`: a form is
    read as it says (`WeightForm.read`), any other array is cast."""
    return w.read(dtype) if isinstance(w, WeightForm) else w.astype(dtype)


def take_rows(table, ids, dtype):
    """Rows `ids` (int, any shape I) of `table` (R, ...) -> (*I, ...) in `dtype`; a
    `WeightForm` table gives up only the rows taken (`WeightForm.take_rows`)."""
    if isinstance(table, WeightForm):
        return table.take_rows(ids, dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def matmul(x, w, n_in: int = 1, out_dtype=None):
    """Contract the last `n_in` axes of x with the first `n_in` axes of w, as a 2-D matmul.

    x (..., *in), w (*in, *out) -> (..., *out) in `out_dtype` (default x's dtype); w is
    read in x's dtype (`weight`); a `FactoredWeight` computes the product itself. Flattening
    x's leading axes into one keeps XLA's backward matmuls canonical (3-D einsums' weight
    gradients ran ~1.7x slower on CPU); w is contracted unreshaped, so the backward pass of a
    layer scan reads each layer's slice of the weights instead of saving a reshaped copy of
    them all.
    """
    if isinstance(w, FactoredWeight):
        return w.matmul(x, n_in, out_dtype)
    if sequence_shards() > 1:  # rows split over one mesh axis and positions over another do not merge into one
        # sharded axis: flattening would gather every position onto every device
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, weight(w, x.dtype), (contract, ((), ())), preferred_element_type=out_dtype)
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    contract = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
    # lax.dot_general, not jnp.matmul: qwix's quantization-aware training intercepts dot_general and einsum
    flat = jax.lax.dot_general(x.reshape(-1, *inner), weight(w, x.dtype), (contract, ((), ())),
                               preferred_element_type=out_dtype)
    return flat.reshape(*lead, *w.shape[n_in:])
