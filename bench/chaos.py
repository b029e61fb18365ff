"""Chaos: a two-process run killed at seeded random moments, resubmitted until it finishes.

    python bench/chaos.py [--kills 2] [--seed 0] [--steps 24] [--dir DIR]

Trains a tiny decoder straight through in one process with two CPU devices, as the reference (its
mesh and arithmetic are the two-process run's: the one cross-device sum, of two terms, is the same
in either order). Then trains it with two local processes (one CPU device each, gloo collectives)
in a fresh run directory, and `--kills` times
SIGKILLs one of the two processes (chosen by the seeded generator) at a random moment: once the run
has logged a random step past where it resumed, or, every other kill, while an asynchronous
checkpoint save is being written (its `*.orbax-checkpoint-tmp*` directory exists). The other
process is left to notice by itself: inside a collective it ends at once with lmjax's one line
(exit 5); elsewhere JAX's coordination service ends it after the heartbeat timeout, lowered here
to HEARTBEAT_SECONDS. Then the same two commands are submitted again. After the kills the run is
left to finish. Prints one JSON line: the kills made and when, the survivors' exit codes (null:
still running SURVIVOR_SECONDS after the kill), the submissions, and whether the final parameters
and Adam state equal the reference's bit for bit. tests/test_faults.py runs it with two kills.
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


HEARTBEAT_SECONDS = 10
SURVIVOR_SECONDS = 60
CLI = ["-m", "lmjax.cli"]


def with_devices(devices: int) -> dict:
    """This environment with `devices` CPU devices (its XLA_FLAGS kept)."""
    return {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                                       f"{devices}"}


def reference_run(run_dir: Path, steps: int) -> None:
    """The uninterrupted run, in one process with two devices; output in run_dir/../NAME.log."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        subprocess.run([sys.executable, *CLI, "train", *TINY, "--set", f"train.steps={steps}", "--set",
                        f"train.run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT, env=with_devices(2),
                       check=True)


def submit(run_dir: Path, steps: int, entries: tuple[list[str], list[str]] = (CLI, CLI)) -> list[subprocess.Popen]:
    """Start the run's two processes (one device each; this environment's XLA_FLAGS kept), appending their
    output to run_dir/../NAME-I.log. `entries`: what each process's python runs (the CLI, or a
    `-c` program that ends by calling it)."""
    port = free_port()
    processes = []
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        log = (run_dir.parent / f"{run_dir.name}-{i}.log").open("a")
        processes.append(subprocess.Popen(
            [sys.executable, *entries[i], "train", *TINY, "--set", f"train.steps={steps}", "--set",
             f"train.run_dir={run_dir}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), "--heartbeat-timeout", str(HEARTBEAT_SECONDS)],
            stdout=log, stderr=subprocess.STDOUT, env=with_devices(1)))
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


def survivor_code(process: subprocess.Popen) -> int | None:
    """The exit code of the process whose peer was killed, once it has ended by itself; None (and
    killed) if it is still running SURVIVOR_SECONDS later."""
    try:
        return process.wait(timeout=SURVIVOR_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return None


def chaos_run(run_dir: Path, steps: int, kills: int, seed: int) -> dict:
    """Train in `run_dir` (new, or one left by earlier submissions) with `kills` seeded SIGKILLs;
    {kills, submissions, moments, survivor_codes}."""
    rng, moments, survivors, submissions = random.Random(seed), [], [], 0
    while True:
        processes, submissions = submit(run_dir, steps), submissions + 1
        if len(moments) < kills:
            victim = rng.randrange(2)  # drawn first: the victims do not depend on the timing
            start = logged_step(run_dir)  # (the resumed run drops the records past its checkpoint later)
            moment = kill_moment(run_dir, processes, len(moments) % 2 == 1, rng.randint(min(start + 1, steps - 1),
                                                                                        steps - 1), time.time() + 600)
            if moment != "finished":
                processes[victim].kill()
                moments.append(f"process {victim} {moment}")
                survivors.append(survivor_code(processes[1 - victim]))
        codes = [p.wait(timeout=900) for p in processes]
        if codes == [0, 0] and logged_step(run_dir) == steps:
            return {"kills": len(moments), "submissions": submissions, "moments": moments,
                    "survivor_codes": survivors}
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
    reference_run(root / "reference", args.steps)
    result = chaos_run(root / "chaos", args.steps, args.kills, args.seed)
    a, b = final_state(root / "reference"), final_state(root / "chaos")
    equal = len(a) == len(b) and all(x.shape == y.shape and (x == y).all() for x, y in zip(a, b))
    print(json.dumps({**result, "steps": args.steps,
                      "bitwise_equal": bool(equal), "dir": str(root)}))


if __name__ == "__main__":
    main()
