"""The records a run writes: metrics.jsonl (one flat dict per logged step) and, for MoE runs,
routing.jsonl (per-layer routing statistics). The writer is `lmjax.train.loggers.MetricsLogger`
(through `json_line`); readers (sweeps, plots, notebooks) need nothing from train.

A NaN or infinite value (a diverged loss, a statistic of no tokens) is written as JSON's null,
which jq, pandas and every JSON parser read (NaN is not JSON); the readers here turn it back
into NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def json_line(record, default=None) -> str:
    """`record` (dicts, lists, numbers, strings) as strict JSON on one line: NaN and ±inf
    become null; `default` as in json.dumps (how other objects are written)."""
    return json.dumps(_finite_or_none(record), allow_nan=False, default=default)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of `<run_dir>/metrics.jsonl`, in order; null values (NaN written) as NaN."""
    return [{k: math.nan if v is None else v for k, v in r.items()}
            for r in read_records(Path(run_dir) / "metrics.jsonl")]


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
    return {key: _array([r[key] for r in records]) for key in records[0]}


def _array(values: list) -> np.ndarray:
    """`values` as an array; nulls (NaN written) make it float with NaN in their place."""
    array = np.asarray(values)
    return np.asarray(values, dtype=float) if array.dtype == object else array
