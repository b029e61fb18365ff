"""After-pretraining features, each an implementation of the trainer's weight transform
(`lmjax.train.transforms`) and, where it keeps weights in a form of its own, of the models'
`WeightForm`: LoRA (`lora`), quantization-aware training (`qat`), int8 weights (`int8`, the
form `lmjax quantize` writes and a quantized run is read in)."""

from __future__ import annotations

from lmjax.adapters.lora import LoRA
from lmjax.adapters.qat import QAT
from lmjax.config import Config
from lmjax.train.transforms import WeightTransform


def weight_transforms(cfg: Config) -> tuple[WeightTransform, ...]:
    """The weight transforms `cfg` turns on: QAT with `quant.weights` int8, LoRA with `lora.rank` > 0
    (checked in this order: QAT refuses LoRA in one line before LoRA looks for its base)."""
    return ((QAT(cfg.quant),) if cfg.quant.weights == "int8" else ()) + ((LoRA(cfg.lora),) if cfg.lora.enabled else ())
