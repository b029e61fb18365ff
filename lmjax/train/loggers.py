"""Where metrics go: a JSONL file in the run directory, wandb, and the console.

Only process 0 writes. Every record is a flat dict with a `step` key and float values.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from lmjax.config import Config
from lmjax.files import write_atomically
from lmjax.records import json_line, read_records


class MetricsLogger:
    """Appends records to `<run_dir>/metrics.jsonl` and, unless log.wandb == "off", to wandb
    (offline by default: files under `<run_dir>/wandb`, no account needed).

    A run continues from `start_step` (its restored checkpoint's step): the records of later
    steps, logged before a crash or kill that lost them, are dropped from metrics.jsonl and
    routing.jsonl first, so each step appears once. (wandb keeps them; it ignores a step
    logged again.)"""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.highest_step_before_resume = 0  # the last step metrics.jsonl held (a killed run's may be lost)
        if not enabled:
            return
        self.highest_step_before_resume = max((r["step"] for r in read_records(self.path)), default=0)
        self.drop_after(start_step)
        if cfg.log.wandb != "off":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.log.wandb_project, name=run_dir.name, id=run_dir.name.replace("/", "_"),
                dir=str(run_dir), mode=cfg.log.wandb, config=cfg.to_dict(), resume="allow" if resume else None,
            )

    def drop_after(self, step: int) -> None:
        """Drop the records of steps after `step` from metrics.jsonl and routing.jsonl (a resume, a roll-back)."""
        if self.enabled:
            for path in (self.path, self.path.parent / "routing.jsonl"):
                _drop_records_after(path, step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json_line(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def log_routing(self, step: int, routing: dict) -> None:
        """Append the per-layer routing statistics (arrays stacked over MoE layers, see
        lmjax.models.moe) to `<run_dir>/routing.jsonl` as nested lists, for the notebooks."""
        if not self.enabled:
            return
        record = {"step": step, **{k: v.tolist() for k, v in routing.items()}}
        with (self.path.parent / "routing.jsonl").open("a") as f:
            f.write(json_line(record) + "\n")

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def environment() -> dict:
    """What produced a run: lmjax's git commit, package versions, devices, command line."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "command": sys.argv,
        "python": platform.python_version(),
        "packages": {p: importlib.metadata.version(p) for p in packages},
        "devices": [d.device_kind for d in jax.devices()],
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite the JSONL file `path` (atomically) without the records of steps after `step`."""
    records = read_records(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) < len(records) or (path.exists() and not path.read_text().endswith("\n")):
        write_atomically(path, lambda f: f.write("".join(json_line(r) + "\n" for r in kept).encode()))


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (ETA included); `disable` when not the main process."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                desc="train", smoothing=0.1)


def console(message: str) -> None:
    """Print above the progress bar without breaking it."""
    tqdm.write(message)
