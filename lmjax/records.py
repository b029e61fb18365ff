"""Reading back the records a run writes: metrics.jsonl (one flat dict per logged step) and,
for MoE runs, routing.jsonl (per-layer routing statistics). The writer is
`lmjax.train.loggers.MetricsLogger`; readers (sweeps, plots, notebooks) need nothing from train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of `<run_dir>/metrics.jsonl`, in order."""
    return read_records(Path(run_dir) / "metrics.jsonl")


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `path`; a last line cut off mid-write (a killed run) is left out."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        return records + [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return records


def read_routing(run_dir: Path) -> dict:
    """`<run_dir>/routing.jsonl` of a MoE run as arrays: "step" (S,) and each routing
    statistic stacked over log steps, e.g. "load" (S, L_moe, E), "dropped" (S, L_moe)."""
    records = read_records(Path(run_dir) / "routing.jsonl")
    if not records:
        return {}
    return {key: np.asarray([r[key] for r in records]) for key in records[0]}
