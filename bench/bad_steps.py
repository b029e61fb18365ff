"""Benchmark the cost of judging bad steps (`lmjax.train.guard`) in an experiment's train step.

    python bench/bad_steps.py [decoder_tiny] [--rounds 10] [--steps 5] [--set ...]

Compiles the step twice: with the guard (the train state carries `GuardState`, as every run's
does) and without it (`guard=None`: the step before bad-step judgment existed). Runs them in
interleaved rounds of `--steps` steps each on one fixed random batch and prints one JSON line with
each median step time and their ratio (guarded / plain). Ratios, not absolute times, are what to
record from a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from train_step import random_batch  # noqa: E402

from lmjax.config_parse import override  # noqa: E402
from lmjax.experiment import load_experiment  # noqa: E402
from lmjax.parallel import batch_sharding, make_mesh  # noqa: E402
from lmjax.train.guard import BadStepRule  # noqa: E402
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from lmjax.train.state import init_train_state  # noqa: E402
from lmjax.train.step import make_train_step  # noqa: E402


def compiled_steps(cfg):
    """{"guarded": (step, state), "plain": (step, state)} and the batch, for the experiment `cfg`."""
    mesh = make_mesh(cfg.mesh)
    total = 10_000
    graphdef, state, shardings, optimizer = init_train_state(
        cfg.model, lambda p: make_optimizer(cfg.optim, total, p, cfg.model), 0, mesh)
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, total), cfg.optim.grad_accum_steps,
                              cfg.model.dropout > 0, cfg.model.moe, bad_steps=BadStepRule.from_config(cfg.train))
    batch = random_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, batch_sharding(mesh))
    steps = {}
    for name, start in (("guarded", state), ("plain", jax.tree.map(lambda x: x.copy(), state._replace(guard=None)))):
        out = shardings if name == "guarded" else shardings._replace(guard=None)
        steps[name] = [jax.jit(step_fn, donate_argnums=0, out_shardings=(out, None, None)).lower(
            start, batch).compile(), start]
    return steps, batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="decoder_tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    steps, batch = compiled_steps(override(load_experiment(args.experiment), args.overrides))
    times = {name: [] for name in steps}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, entry in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                entry[1], metrics, _ = entry[0](entry[1], batch)
                jax.block_until_ready(metrics)
                if round_index:
                    times[name].append(time.perf_counter() - start)
    guarded, plain = statistics.median(times["guarded"]), statistics.median(times["plain"])
    print(json.dumps({"experiment": args.experiment, "device": jax.devices()[0].device_kind,
                      "guarded_step_ms": round(guarded * 1e3, 3), "plain_step_ms": round(plain * 1e3, 3),
                      "ratio": round(guarded / plain, 4)}))


if __name__ == "__main__":
    main()
