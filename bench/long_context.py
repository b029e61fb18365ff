"""Long sequences on a context-parallel mesh: per-device memory and step time against length.

    python bench/long_context.py                                   # seq 1024..8192 x context 1, 2, 4, 8
    python bench/long_context.py --seq-lens 256 --contexts 1,2 --steps 1  # a quick check
    python bench/long_context.py --seq-lens 8192 --contexts 1,2,4 --steps 0  # memory only: compile, no step

Runs on 8 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set when
XLA_FLAGS is unset, before jax starts). For each sequence length and context size n, a tiny
decoder (width 64, 2 layers, 4 heads, 2 kv heads, vocabulary 384, float32, remat full) is
trained for `--steps` steps on one row of random tokens over a mesh of n devices
(mesh.context=n, data 1): the batch goes through `parallel.global_batch` (the load-balanced
order), as in training. One JSON line per (seq_len, context) gives XLA's `memory_analysis()`
per device (temporaries, arguments), `lmjax plan`'s estimate of the activations per device
(`memory_activations_bytes`, with the gathered keys and values), the K/V bytes each device
receives per step (`context_comm_bytes_per_step`), the loss of every step, and the median
step time. On CPU the step time measures overhead only (8 "devices" share the host's cores,
the collectives are memory copies); memory is what the table in docs/benchmarks.md is for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def long_config(seq_len: int, context: int, remat: str = "full"):
    """The benchmark's Config: tiny decoder, one row of `seq_len`, mesh context x 1, warmup of
    one step (so that the losses of the steps move)."""
    from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

    model = ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_seq_len=seq_len, dtype="float32", remat=remat)
    return Config(model=model, data=DataConfig(seq_len=seq_len), train=TrainConfig(batch_size=1),
                  mesh=MeshConfig(data=1, context=context), optim=OptimConfig(warmup_steps=1))


def random_rows(seq_len: int, vocab: int, seed: int = 0) -> dict:
    """One row of random tokens as the decoder's batch (numpy, natural order)."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, vocab, (1, seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.arange(seq_len, dtype=np.int32)[None],
            "segment_ids": np.ones((1, seq_len), np.int32), "loss_mask": np.ones((1, seq_len), np.float32)}


def measure(seq_len: int, context: int, steps: int) -> dict:
    """Compile (memory_analysis) and train `steps` steps on the first `context` devices."""
    import jax

    from lmjax.parallel import batch_sharding, global_batch, make_mesh, validate_layout
    from lmjax.scaling.memory import memory_estimate
    from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
    from lmjax.train.state import init_train_state
    from lmjax.train.step import make_train_step

    cfg = long_config(seq_len, context)
    mesh = make_mesh(cfg.mesh, jax.devices()[:context])
    validate_layout(cfg, mesh)
    graphdef, state, shardings, optimizer = init_train_state(
        cfg.model, lambda p: make_optimizer(cfg.optim, 100, p), 0, mesh)
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, 100), 1, False, cfg.model.moe)
    batch = global_batch(random_rows(seq_len, cfg.model.vocab_size), batch_sharding(mesh), 1)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None, None)).lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics, _ = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    estimate = memory_estimate(cfg, context)
    return {"seq_len": seq_len, "context": context, "xla_temp_bytes": analysis.temp_size_in_bytes,
            "xla_arguments_bytes": analysis.argument_size_in_bytes,
            "estimate_activations_bytes": estimate["memory_activations_bytes"],
            "estimate_context_comm_bytes_per_step": estimate.get("context_comm_bytes_per_step", 0),
            "losses": losses, "step_ms_median": statistics.median(times) * 1e3 if times else None,
            "timing": "CPU: overhead only"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192")
    parser.add_argument("--contexts", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax

    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            print(json.dumps({"device": jax.devices()[0].device_kind, **measure(seq_len, context, args.steps)}),
                  flush=True)


if __name__ == "__main__":
    main()
