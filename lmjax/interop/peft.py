"""`lmjax lora export-peft`: a LoRA run's adapters in PEFT's format, for the base run that
`lmjax convert to-hf` exports.

PEFT's LoRA layer on a torch Linear (weight (out, in)) adds (lora_alpha / r) lora_B lora_A x,
lora_A (r, in) and lora_B (out, r). lmjax's adapter of a weight (*in, *out) is A (*in, r),
B (r, *out) (`lmjax.adapters.lora`), so lora_A is A flattened to (in, r) and transposed, lora_B is B
flattened to (r, out) and transposed: the weight's own export rule (`interop.rules.Linear`)
applied to each factor. Weights whose export is not one torch Linear (Mixtral's experts,
stored fused by transformers) have no PEFT LoRA layer and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lmjax.adapters.lora import path_name
from lmjax.config import ConfigError
from lmjax.interop.convert import family_architecture, layer_count
from lmjax.interop.rules import Linear


def export_peft(run_dir: Path, out_dir: Path) -> None:
    """Write `out_dir`/adapter_config.json and adapter_model.safetensors from the newest
    adapters of the LoRA run `run_dir`. Checks run before anything is written."""
    from safetensors.numpy import save_file

    from lmjax.adapters import weight_transforms
    from lmjax.config import MeshConfig
    from lmjax.parallel import make_mesh
    from lmjax.train.restore import load_config, restore_trained_onto

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir)
    if not cfg.lora.enabled:
        raise ConfigError(f"{run_dir} is not a LoRA run (lora.rank=0): there are no adapters to export.")
    architecture = family_architecture(cfg.model)
    rules = architecture.tensor_rules(cfg.model)
    adapters = restore_trained_onto(run_dir, make_mesh(MeshConfig()), None, weight_transforms(cfg))[2]
    factors: dict[tuple, dict] = {}
    for path, variable in nnx.to_flat_state(adapters):
        factors.setdefault(tuple(path[:-1]), {})[path[-1]] = np.asarray(jax.device_get(variable[...]))
    tensors, modules = {}, set()
    for path, pair in factors.items():
        rule = rules.get(path)
        if not isinstance(rule, Linear):
            raise ConfigError(f"{path_name(path)} has no PEFT LoRA layer in transformers (its export is not one "
                              "torch Linear); leave it out of lora.targets to export the adapters.")
        layers = layer_count(path, cfg.model)
        for i in [None] if layers is None else range(layers):
            ids = {} if i is None else {"i": i}
            a, b = (pair[k] if i is None else pair[k][i] for k in ("lora_a", "lora_b"))
            (name, lora_a), = Linear(rule.names, rule.n_in).write(a, **ids).items()
            (_, lora_b), = Linear(rule.names, 1).write(b, **ids).items()
            module = name.removesuffix(".weight")
            modules.add(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    adapter_config = {"peft_type": "LORA", "task_type": architecture.PEFT_TASK_TYPE, "r": cfg.lora.rank,
                      "lora_alpha": cfg.lora.alpha, "target_modules": sorted(modules), "lora_dropout": 0.0,
                      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
                      "base_model_name_or_path": None, "inference_mode": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
