"""Compare `lmjax.scaling.memory.memory_estimate` with what XLA reports for the compiled step.

    python bench/memory.py decoder_tiny [--set model.remat=full ...]

Compiles one training step from abstract shapes (nothing is allocated) and prints, per remat
policy, XLA's `memory_analysis()` next to the estimate: arguments (train state + batch)
against weights + Adam moments, and temporaries against gradients + activations. One JSON
line per policy.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from lmjax.adapters import weight_transforms
from lmjax.cli import transform_bytes
from lmjax.config_parse import override
from lmjax.experiment import load_experiment
from lmjax.parallel import batch_sharding, make_mesh
from lmjax.scaling.memory import memory_estimate
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import abstract_model, abstract_train_state
from lmjax.train.step import make_train_step


def compiled_memory(cfg) -> dict:
    """XLA's argument and temporary bytes of the compiled train step of `cfg` (a decoder): full
    training, or with `lora.rank` > 0 the LoRA step, whose arguments also hold the frozen base."""
    mesh = make_mesh(cfg.mesh)
    transforms = weight_transforms(cfg)
    graphdef, abstract, optimizer = abstract_train_state(cfg.model, lambda p: make_optimizer(cfg.optim, 100, p), mesh,
                                                         transforms)
    frozen = [abstract_model(cfg.model)[1]] if cfg.lora.enabled else []
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, 100), cfg.optim.grad_accum_steps,
                              cfg.model.dropout > 0, cfg.model.moe, transforms)
    rows = batch_sharding(mesh)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for name, dtype in (
        ("inputs", jnp.int32), ("targets", jnp.int32), ("positions", jnp.int32), ("segment_ids", jnp.int32),
        ("loss_mask", jnp.float32))}
    with jax.set_mesh(mesh):
        analysis = jax.jit(step_fn, donate_argnums=0).lower(abstract, batch, *frozen).compile().memory_analysis()
    return {"xla_arguments_bytes": analysis.argument_size_in_bytes, "xla_temp_bytes": analysis.temp_size_in_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    for remat in ("none", "dots", "full"):
        cfg = override(load_experiment(args.experiment), args.overrides + [f"model.remat={remat}"])
        estimate = memory_estimate(cfg, len(jax.devices()), **transform_bytes(cfg))
        xla = compiled_memory(cfg)
        state = (estimate["memory_weights_bytes"] + estimate["memory_master_weights_bytes"]
                 + estimate["memory_adam_bytes"])
        temporaries = estimate["memory_gradients_bytes"] + estimate["memory_activations_bytes"]
        print(json.dumps({
            "experiment": args.experiment, "remat": remat, "device": jax.devices()[0].device_kind, **xla,
            "estimate_state_bytes": round(state), "estimate_grads_activations_bytes": round(temporaries),
            "ratio_temp_estimate_over_xla": round(temporaries / xla["xla_temp_bytes"], 3),
            "ratio_state_estimate_over_xla_arguments": round(state / xla["xla_arguments_bytes"], 3),
        }))


if __name__ == "__main__":
    main()
