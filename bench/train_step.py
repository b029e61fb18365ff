"""Benchmark one experiment's training step: compile time, step time, tokens/s and MFU.

    python bench/train_step.py gpt_small_bench [--steps 30] [--set model.scan_layers=false ...]

Batches are random tokens (no data loading in the timing); MFU uses the FLOP count of
`lmjax.scaling.counting.train_flops_per_token` over the device peak (a measured matmul
probe on CPU). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lmjax.config import override
from lmjax.experiment import load_experiment
from lmjax.parallel import batch_sharding, make_mesh
from lmjax.scaling.counting import param_counts, train_flops_per_token
from lmjax.train.metrics import mfu, peak_flops_per_device
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import init_train_state
from lmjax.train.step import make_train_step


def random_batch(batch_size: int, seq_len: int, vocab: int, rows):
    tokens = jax.random.randint(jax.random.key(0), (batch_size, seq_len + 1), 0, vocab)
    batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len)),
        "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
        "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32),
    }
    return jax.device_put(batch, rows)


def bench(experiment: str, overrides: list[str], steps: int, vocab: int | None) -> dict:
    cfg = override(load_experiment(experiment), overrides)
    mesh = make_mesh(cfg.mesh)
    total = 10_000
    graphdef, state, shardings, optimizer = init_train_state(
        cfg.model, lambda p: make_optimizer(cfg.optim, total, p), 0, mesh)
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, total),
                              cfg.optim.grad_accum_steps, cfg.model.dropout > 0)
    batch = random_batch(cfg.train.batch_size, cfg.data.seq_len, vocab or cfg.model.vocab_size, batch_sharding(mesh))
    start = time.perf_counter()
    train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None)).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(3):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg.model.dtype) * len(jax.devices())
    return {
        "experiment": experiment, "overrides": overrides, "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()), "params": param_counts(cfg.model)["params_total"],
        "compile_seconds": round(compile_seconds, 2), "step_ms": round(step_seconds * 1e3, 2),
        "tokens_per_second": round(tokens / step_seconds), "peak_tflops": round(peak / 1e12, 4),
        "mfu": round(mfu(tokens / step_seconds, flops_per_token, peak), 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=None, help="draw tokens below this id (default: model vocab)")
    args = parser.parse_args()
    print(json.dumps(bench(args.experiment, args.overrides, args.steps, args.vocab)))


if __name__ == "__main__":
    main()
