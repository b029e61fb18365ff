"""Which kernel runs attention and the dropless MoE's grouped matmul, chosen per backend.

Attention (`model.attention`): "einsum" is the written-out form, "dot_product" is
`jax.nn.dot_product_attention` with XLA's implementation, and "auto" takes cuDNN's fused flash
attention (`implementation="cudnn"`) on a GPU whenever the public API can express the mask
(causal, and right padding as per-row lengths), XLA's dot_product_attention on a GPU otherwise
(saying why, once), and einsum off GPU, where its backward pass ran ~2x faster (docs/benchmarks.md).

Grouped matmul (`model.moe.grouped_matmul=auto`): the per-backend table `GROUPED_MATMUL`, each
entry with the measurement it rests on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# backend -> (kernel, the evidence: date, machine, result)
GROUPED_MATMUL = {
    "cpu": ("blocks", "2026-11-24, 2-core CPU, jax 0.10.2: blocks 1.56x dense, ragged_dot 4.25x (docs/benchmarks.md)"),
    "tpu": ("ragged_dot", "not measured here: ragged_dot lowers to the TPU grouped-matmul (megablox) kernel"),
    "gpu": ("ragged_dot", "NOT YET MEASURED on a GPU: ragged_dot lowers to a grouped GEMM there; bench/gpu_suite.py "
                          "times both kernels, and its result replaces this entry"),
}


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Where queries may attend: the boolean mask `dense` (B, 1, T, S), and what the fused cuDNN
    kernel needs instead of it: `causal` (query t sees keys s <= t) and right padding as
    `query_lengths` / `key_lengths` (B,) int32, the tokens before each row's padding (None: no
    padding). `not_fusable` names what the public API cannot express (None: it can express it all),
    e.g. several packed documents in one row, which need the dense segment mask."""

    dense: jax.Array
    causal: bool = False
    query_lengths: jax.Array | None = None
    key_lengths: jax.Array | None = None
    not_fusable: str | None = None

    @classmethod
    def of(cls, mask) -> AttentionMask:
        """`mask` as an AttentionMask: a bare (B, 1, T, S) array is an arbitrary mask."""
        return mask if isinstance(mask, AttentionMask) else cls(mask, not_fusable="an arbitrary boolean mask")


def right_padding_lengths(segment_ids):
    """(B,) int32 tokens before the padding of right-padded rows (segment id 0 on padding)."""
    return jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)


def backend() -> str:
    """The platform computations run on ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def cudnn_obstacle(mask: AttentionMask, has_bias: bool, dtype, head_dim: int) -> str | None:
    """Why cuDNN flash attention cannot run this call through the public API, or None."""
    if mask.not_fusable:
        return mask.not_fusable
    if has_bias:
        return "an additive attention bias (relative positions)"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"{jnp.dtype(dtype).name} compute (cuDNN flash attention takes bfloat16 or float16)"
    if head_dim % 8 or head_dim > 256:
        return f"head width {head_dim} (cuDNN needs a multiple of 8, at most 256)"
    return None


def select_attention(setting: str, mask: AttentionMask, has_bias: bool, dtype, head_dim: int) -> str:
    """The kernel for `model.attention` = `setting` on this backend: "einsum", "xla"
    (`jax.nn.dot_product_attention` with the dense mask) or "cudnn" (fused, causal flag and
    lengths instead of the mask). On a GPU, "auto" logs its choice once per distinct reason."""
    if setting == "einsum":
        return "einsum"
    if setting == "dot_product":
        return "xla"
    if backend() != "gpu":
        return "einsum"
    obstacle = cudnn_obstacle(mask, has_bias, dtype, head_dim)
    if obstacle is None:
        _log_once(logging.INFO, "attention: cuDNN flash attention")
        return "cudnn"
    _log_once(logging.WARNING, f"attention: XLA's dot_product_attention, not cuDNN, because of {obstacle}")
    return "xla"


@functools.cache
def _log_once(level: int, message: str) -> None:
    log.log(level, message)


def select_grouped_matmul(setting: str) -> str:
    """The dropless MoE kernel for `model.moe.grouped_matmul` = `setting` on this backend."""
    return GROUPED_MATMUL.get(backend(), GROUPED_MATMUL["cpu"])[0] if setting == "auto" else setting
