"""Cost of a stop and of a resubmission: SIGTERM to exit, and restart to the first new step.

    python bench/preemption.py [--model tiny|100m] [--signal-at-step 3]

Starts `lmjax train` (one process, this machine's devices) on a fresh run directory, sends
SIGTERM once metrics.jsonl shows step `--signal-at-step`, and measures the seconds until the
process exits and how many steps it trained after the signal (it saves one checkpoint at the
step it stops at). Then it runs the same command again and measures the seconds from its
start to the first new step in metrics.jsonl (start-up, restore, compile, one step). Prints
one JSON line. `tiny` is the default experiment (decoder_tiny); `100m` is a 12-layer,
d_model 768 decoder (about 100M parameters with a 32k vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "tiny": [],
    "100m": ["--set", "model.d_model=768", "--set", "model.n_layers=12", "--set", "model.n_heads=12",
             "--set", "model.d_ff=2048", "--set", "model.vocab_size=32768", "--set", "train.batch_size=4",
             "--set", "data.seq_len=256"],
}


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass  # a line being written
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--signal-at-step", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="lmjax-preemption-")) / "run"
    command = [sys.executable, "-m", "lmjax.cli", "train", "decoder_tiny", *MODELS[args.model],
               "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.checkpoint_every=100000",
               "--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", f"train.run_dir={run_dir}"]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while max(logged_steps(run_dir), default=0) < args.signal_at_step:
        time.sleep(0.01)
    signalled_at, step_at_signal = time.perf_counter(), max(logged_steps(run_dir))
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate()
    stop_seconds = time.perf_counter() - signalled_at
    stopped = int(re.search(r"run stopped at step (\d+)", output).group(1))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while max(logged_steps(run_dir), default=0) <= stopped:
        time.sleep(0.01)
    first_new_step_seconds = time.perf_counter() - started
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate()
    compiled = float(re.search(r"compiled in ([\d.]+)s", output).group(1))
    print(json.dumps({"model": args.model, "sigterm_to_exit_seconds": round(stop_seconds, 2),
                      "steps_after_signal": stopped - step_at_signal, "saves": 1,
                      "resubmission_to_first_new_step_seconds": round(first_new_step_seconds, 2),
                      "of_which_compile_seconds": compiled}))


if __name__ == "__main__":
    main()
