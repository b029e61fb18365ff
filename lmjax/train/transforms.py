"""Weight transforms: how an after-pretraining feature changes what a run trains.

The trainer (`state`, `step`, `setup`) takes a tuple of `WeightTransform`s and asks them, never
a feature by name: LoRA trains adapters beside frozen weights, quantization-aware training wraps
the model so its matmuls read fake-quantized weights. The implementations live above the
trainer, in `lmjax.adapters`; `lmjax.adapters.weight_transforms(cfg)` gives those a config
turns on. A new feature is one more implementation there, not a new branch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from flax import nnx

from lmjax.config import Config, ConfigError

# The settings that turn a transform on: transform name -> (is it on?, the setting, in words).
TURNED_ON_BY = {
    "lora": (lambda cfg: cfg.lora.enabled, lambda cfg: f"lora.rank={cfg.lora.rank}"),
    "qat": (lambda cfg: cfg.quant.weights != "none", lambda cfg: f"quant.weights={cfg.quant.weights}"),
}


class WeightTransform:
    """What the trainer asks of an after-pretraining feature; each default changes nothing.

    name: the feature's key in TURNED_ON_BY. A transform that also trains weights of its own
    beside the model's frozen ones is an `Adapter`.
    """

    name: str = ""

    def check(self, cfg: Config, init_from: Path | None) -> Config:
        """`cfg` completed for this transform (e.g. the run it adapts), or ConfigError."""
        return cfg

    def wrap_model(self, model: nnx.Module) -> nnx.Module:
        """The model the step runs (e.g. under qwix's QtProvider); its params are `model`'s."""
        return model

    def sizes(self, cfg: Config) -> dict:
        """Plain byte counts for the memory estimate, by its keyword (`lmjax.scaling.memory.
        memory_estimate`: LoRA's `adapter_bytes`, int8's `int8_bytes`)."""
        return {}


@runtime_checkable
class Adapter(Protocol):
    """A transform whose run trains its own weights (`init_trainable`, e.g. LoRA's A and B)
    while the model's, read from `frozen_run`, stay frozen; the training step's model reads
    `apply(frozen, trained)`, everything after training `fold(frozen, trained)`."""

    def frozen_run(self, cfg: Config) -> Path: ...

    def init_trainable(self, abstract_params: nnx.State, seed: int) -> nnx.State: ...

    def apply(self, frozen: nnx.State, trained: nnx.State) -> nnx.State: ...

    def fold(self, frozen: nnx.State, trained: nnx.State) -> nnx.State: ...


def check_transforms(cfg: Config, transforms: tuple[WeightTransform, ...], init_from: Path | None) -> Config:
    """`cfg` completed by each transform's `check` (given the run to start from, `init_from`);
    ConfigError, in one line, when the config turns a feature on whose transform is not among
    `transforms`, or two transforms adapt."""
    given = {t.name for t in transforms}
    for name, (on, setting) in TURNED_ON_BY.items():
        if on(cfg) and name not in given:
            raise ConfigError(f"{setting(cfg)} needs the {name} weight transform, which this trainer was not given; "
                              "pass lmjax.adapters.weight_transforms(cfg) (the lmjax CLI does).")
    if sum(isinstance(t, Adapter) for t in transforms) > 1:
        raise ConfigError(f"transforms {sorted(given)}: at most one may train weights beside the frozen model's.")
    for transform in transforms:
        cfg = transform.check(cfg, init_from)
    return cfg


def adapter_of(transforms: tuple[WeightTransform, ...]) -> Adapter | None:
    """The transform that trains its own weights beside the frozen model's, if any."""
    return next((t for t in transforms if isinstance(t, Adapter)), None)


def wrap_model(model: nnx.Module, transforms: tuple[WeightTransform, ...]) -> nnx.Module:
    """`model` wrapped by each transform in turn."""
    for transform in transforms:
        model = transform.wrap_model(model)
    return model
