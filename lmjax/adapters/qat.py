"""Quantization-aware training (`quant.weights=int8`) as the trainer's weight transform: the
model runs under qwix's QtProvider, so every matmul reads its weight fake-quantized (symmetric
absmax int8, one scale per output unit, as `lmjax quantize` stores it) and the gradient passes
straight through. The weights, Adam moments and checkpoints stay float.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from lmjax.adapters.int8 import int8_weight_bytes
from lmjax.config import Config, ConfigError, QuantConfig
from lmjax.train.transforms import WeightTransform


def quantization_aware(model: nnx.Module) -> nnx.Module:
    """`model` under qwix's QtProvider (quantization-aware training): every weight that meets
    `jax.lax.dot_general` or `jnp.einsum` inside the model's `__call__` is fake-quantized in
    the forward pass (symmetric absmax int8, one scale per output unit, as `lmjax quantize`
    stores it) and passes its gradient straight through. Embedding lookups are not intercepted
    and stay float (a tied table is fake-quantized where it is the output head). qwix finds the
    weights by tracing a jitted call back to the nnx.Param: call the model under jit."""
    import qwix

    class TracedWeightsProvider(qwix.QtProvider):
        """qwix's QtProvider that takes an operand for a weight only where it traces back to the
        module's nnx.Param through one-input steps (astype, squeeze, reshape). qwix otherwise
        falls back to matching shapes, which took a (B, T, D) activation for the output
        projection (N, H, D) whenever B == N and T == H ("lhs and rhs cannot be both weights")."""

        def _create_dot_general_qt_config(self, *args, **kwargs):
            with _traced_weights_only():
                return super()._create_dot_general_qt_config(*args, **kwargs)

    provider = TracedWeightsProvider([qwix.QtRule(module_path=".*", weight_qtype=jnp.int8)])
    return qwix.quantize_model(model, provider, skip_nnx_init=True)


@contextlib.contextmanager
def _traced_weights_only():
    """Within: qwix's `find_param` names the current module's nnx.Param an array is, or was
    made from by one-input primitives, and None for any other array (no shape guess)."""
    from qwix._src.utils import flax_util

    guess = flax_util.find_param

    def traced(x, ptq_array_type=None):
        params = {id(node.value): name for name, node in vars(flax_util.get_current_module()).items()
                  if isinstance(node, nnx.Param)}
        while id(x) not in params:
            parent = getattr(x, "parent", None)
            if parent is None or len(parent.in_tracers) != 1:
                return None
            x = parent.in_tracers[0]
        return params[id(x)]

    flax_util.find_param = traced
    try:
        yield
    finally:
        flax_util.find_param = guess


def check_quantization_aware(cfg: Config) -> None:
    """ConfigError for a training config with `quant.weights` int8 that QAT cannot run."""
    if cfg.quant.granularity != "channel":
        raise ConfigError(f"quant.granularity={cfg.quant.granularity!r}: quantization-aware training fake-quantizes "
                          "per output unit only; use quant.granularity=channel.")
    if cfg.lora.enabled:
        raise ConfigError("quant.weights=int8 (quantization-aware training) with lora.rank > 0 is not offered; "
                          "train the adapters in float, merge, then run lmjax quantize.")
    if cfg.model.moe.enabled and cfg.model.moe.dispatch != "capacity":
        raise ConfigError(f"quant.weights=int8 (quantization-aware training) with model.moe.dispatch="
                          f"{cfg.model.moe.dispatch!r}: qwix sees a weight only where it meets an einsum whole, and "
                          "dropless dispatch gathers experts per block or per device; use model.moe.dispatch=capacity.")


@dataclasses.dataclass(frozen=True)
class QAT(WeightTransform):
    """Quantization-aware training: the step's model is `quantization_aware(model)`."""

    cfg: QuantConfig
    name: str = "qat"

    def check(self, cfg: Config, init_from: Path | None) -> Config:
        check_quantization_aware(cfg)
        return cfg

    def wrap_model(self, model: nnx.Module) -> nnx.Module:
        return quantization_aware(model)

    def sizes(self, cfg: Config) -> dict[str, tuple[int, int]]:
        """{"int8_bytes": (the model's weights as `lmjax quantize` stores them: int8 matrices,
        float32 scales, vectors in `param_dtype`; the same weights in `param_dtype`)}."""
        return {"int8_bytes": int8_weight_bytes(cfg.model, cfg.quant.granularity)}
