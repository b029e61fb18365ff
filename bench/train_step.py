"""Benchmark one experiment's training step: compile time, step time, tokens/s and MFU.

    python bench/train_step.py gpt_small_bench [--steps 20] [--vocab 65] [--set model.remat=full ...]

Batches are random tokens (no data loading in the timing); MFU uses the FLOP count of
`lmjax.scaling.counting.train_flops_per_token` over the device peak (a measured matmul
probe on CPU). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lmjax.axis_rules import pipeline_schedule
from lmjax.config_parse import override
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


class StepRunner:
    """A compiled training step of an experiment, with its state and a fixed random batch."""

    def __init__(self, experiment: str, overrides: list[str], vocab: int | None = None):
        self.cfg = cfg = override(load_experiment(experiment), overrides)
        # random tokens need no tokenizer, so the vocabulary may be smaller than the byte tokenizer's
        self.model = model = cfg.model if vocab is None else dataclasses.replace(cfg.model, vocab_size=vocab)
        mesh = make_mesh(cfg.mesh)
        total = 10_000
        graphdef, self.state, shardings, optimizer = init_train_state(
            model, lambda p: make_optimizer(cfg.optim, total, p), 0, mesh)
        step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, total),
                                  cfg.optim.grad_accum_steps, model.dropout > 0, model.moe)
        self.batch = random_batch(cfg.train.batch_size, cfg.data.seq_len, model.vocab_size, batch_sharding(mesh))
        start = time.perf_counter()
        with jax.set_mesh(mesh), pipeline_schedule(cfg.mesh.pipeline_microbatches, cfg.mesh.pipeline_repeats):
            self.step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None, None)).lower(
                self.state, self.batch).compile()  # traced under the mesh and schedule, as the trainer does
        self.compile_seconds = time.perf_counter() - start
        self.step_times(3)  # warm up

    def step_times(self, steps: int) -> list[float]:
        """Seconds of each of `steps` consecutive steps (each waited for)."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics, _ = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return times

    def mfu(self, step_seconds: float) -> float:
        tokens = self.cfg.train.batch_size * self.cfg.data.seq_len
        peak = peak_flops_per_device(self.model.dtype) * len(jax.devices())
        return mfu(tokens / step_seconds, train_flops_per_token(self.model, self.cfg.data.seq_len), peak)


def add_turn_arguments(parser: argparse.ArgumentParser) -> None:
    """--rounds, --steps and --set (overrides for every runner) of the benchmarks that time runners in turns."""
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])


def median_step_ms_in_turns(variants: dict, overrides: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median step milliseconds of each variant {name: (experiment, overrides)}: the runners take
    `rounds` turns of `steps` steps within one process, so all see the same machine state."""
    runners = {name: StepRunner(exp, sets + overrides) for name, (exp, sets) in variants.items()}
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name] += runner.step_times(steps)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=None, help="model vocabulary size (default: the experiment's)")
    args = parser.parse_args()
    runner = StepRunner(args.experiment, args.overrides, args.vocab)
    step_seconds = statistics.median(runner.step_times(args.steps))
    tokens = runner.cfg.train.batch_size * runner.cfg.data.seq_len
    print(json.dumps({
        "experiment": args.experiment, "overrides": args.overrides, "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()), "params": param_counts(runner.model)["params_total"],
        "compile_seconds": round(runner.compile_seconds, 2), "step_ms": round(step_seconds * 1e3, 2),
        "tokens_per_second": round(tokens / step_seconds),
        "peak_tflops_per_device": round(peak_flops_per_device(runner.model.dtype) / 1e12, 4),
        "mfu": round(runner.mfu(step_seconds), 4),
    }))


if __name__ == "__main__":
    main()
