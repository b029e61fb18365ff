"""Chaos: a two-process run killed at seeded random moments, resubmitted until it finishes.

    python bench/chaos.py [--kills 2] [--seed 0] [--steps 24] [--dir DIR]

Trains a tiny decoder with two local processes (one CPU device each, gloo collectives) straight
through, as the reference. Then trains it again in a fresh run directory, and `--kills` times
SIGKILLs one of the two processes (chosen by the seeded generator) at a random moment: once the run
has logged a random step past where it resumed, or, every other kill, while an asynchronous
checkpoint save is being written (its `*.orbax-checkpoint-tmp*` directory exists). The other process
is killed too, as a scheduler ends a job one of whose tasks died, and the same two commands are
submitted again. After the kills the run is left to finish. Prints one JSON line: the kills made,
the submissions, and whether the final parameters and Adam state equal the reference's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
        "--set", "model.max_seq_len=32", "--set", "data.seq_len=32", "--set", "data.max_bytes=200000",
        "--set", "train.batch_size=4", "--set", "log.wandb=off", "--set", "log.progress_bar=false",
        "--set", "train.sample_tokens=0", "--set", "train.eval_batches=1", "--set", "train.eval_every=1000",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=3", "--set", "mesh.data=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(run_dir: Path, steps: int) -> list[subprocess.Popen]:
    """Start the run's two processes (one device each), appending their output to run_dir/../NAME-I.log."""
    port = free_port()
    processes = []
    for i in range(2):
        log = (run_dir.parent / f"{run_dir.name}-{i}.log").open("a")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "lmjax.cli", "train", *TINY, "--set", f"train.steps={steps}", "--set",
             f"train.run_dir={run_dir}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}))
    return processes


def logged_step(run_dir: Path) -> int:
    from lmjax.records import read_metrics

    return max([0] + [r["step"] for r in read_metrics(run_dir) if "loss" in r])


def kill_moment(run_dir: Path, processes, during_save: bool, step: int, deadline: float) -> str:
    """Wait for the moment (a save of this submission in flight, or `step` logged); what it was, or 'finished'."""
    def saving():
        return set((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))

    left_before = saving()  # a killed submission's partial save, which this one replaces
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if during_save and saving() - left_before:
            return f"during the save of step {sorted(saving() - left_before)[0].name.split('.')[0]}"
        if not during_save and logged_step(run_dir) >= step:
            return f"at step {logged_step(run_dir)}"
        time.sleep(0.005)
    return "finished"


def chaos_run(run_dir: Path, steps: int, kills: int, seed: int) -> dict:
    """Train in `run_dir` with `kills` seeded SIGKILLs; {kills, submissions, moments}."""
    rng, moments, submissions = random.Random(seed), [], 0
    while True:
        processes, submissions = submit(run_dir, steps), submissions + 1
        if len(moments) < kills:
            start = logged_step(run_dir)
            moment = kill_moment(run_dir, processes, len(moments) % 2 == 1, rng.randint(start + 1, steps - 1),
                                 time.time() + 600)
            if moment != "finished":
                victim = rng.randrange(2)
                processes[victim].kill()
                processes[1 - victim].kill()
                moments.append(f"process {victim} {moment}")
        codes = [p.wait(timeout=900) for p in processes]
        if codes == [0, 0] and logged_step(run_dir) == steps:
            return {"kills": len(moments), "submissions": submissions, "moments": moments}
        if submissions > kills + 3:
            raise RuntimeError(f"the run did not finish after {submissions} submissions (exit codes {codes})")


def final_state(run_dir: Path):
    """Params and optimizer state of the newest checkpoint, as numpy arrays (restored onto this process's devices)."""
    import jax
    import numpy as np

    from lmjax.checkpoint import Checkpointer
    from lmjax.config import MeshConfig
    from lmjax.parallel import make_mesh
    from lmjax.scaling.counting import total_steps
    from lmjax.train.optimizer import make_optimizer
    from lmjax.train.restore import load_config
    from lmjax.train.rollback import restore_train_state
    from lmjax.train.state import abstract_train_state

    cfg = load_config(run_dir)
    def optimizer_for(params):
        return make_optimizer(cfg.optim, total_steps(cfg), params, cfg.model)

    _, abstract, _ = abstract_train_state(cfg.model, optimizer_for, make_mesh(MeshConfig()))
    checkpointer = Checkpointer(run_dir, async_save=False)
    state = restore_train_state(checkpointer, abstract)[0]
    checkpointer.close()
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="lmjax-chaos-"))
    reference = chaos_run(root / "reference", args.steps, 0, args.seed)
    result = chaos_run(root / "chaos", args.steps, args.kills, args.seed)
    a, b = final_state(root / "reference"), final_state(root / "chaos")
    equal = len(a) == len(b) and all(x.shape == y.shape and (x == y).all() for x, y in zip(a, b))
    print(json.dumps({**result, "reference_submissions": reference["submissions"], "steps": args.steps,
                      "bitwise_equal": bool(equal), "dir": str(root)}))


if __name__ == "__main__":
    main()
