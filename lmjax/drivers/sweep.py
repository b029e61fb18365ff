"""Sweeps: many `lmjax train` runs from one experiment, run one after another, resumable.

A sweep file in `experiments/` defines `sweep() -> Sweep`. Each run is an ordinary run in
`SWEEP_DIR/<run name>/` (config.json, metrics.jsonl, checkpoints/); a run is finished when
its `result.json` exists. Restarting a killed sweep skips finished runs and resumes the
interrupted one from its newest checkpoint. `results.csv` holds one row per finished run:
name, N (non-embedding active params), N_total, D (tokens), C (budget, or 6-rule compute
of the run), C_actual (counted training FLOPs), train_loss, val_loss, and, when any run
is a MoE, G (its `model.moe.granularity`; empty for dense runs) for `lmjax fit`'s
granularity law.

WSD cooldown branches (`wsd_branches`): runs of one shape that differ only in length
share a "trunk" run with schedule "wsd"; the trunk trains in the stable phase up to each
branch's decay start, and the branch continues from a copy of the trunk's checkpoint with
its own decay. This equals training each branch from scratch, at a fraction of the cost.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmjax.config import Config, ConfigError
from lmjax.config_parse import override
from lmjax.experiment import load_experiment, load_experiment_module
from lmjax.files import write_atomically, write_json_atomically
from lmjax.records import read_metrics
from lmjax.scaling.counting import param_counts, run_flops_per_token, tokens_per_step, total_steps

RESULT_COLUMNS = ("name", "N", "N_total", "D", "C", "C_actual", "train_loss", "val_loss")


@dataclass(frozen=True)
class SweepRun:
    """One run: `overrides` (--set strings) on the sweep's experiment. `trunk` names the
    stable-phase run it is a WSD cooldown branch of (None: trained from scratch)."""

    name: str
    overrides: tuple[str, ...]
    trunk: str | None = None


@dataclass(frozen=True)
class Sweep:
    experiment: str  # experiment name or .py path
    runs: tuple[SweepRun, ...]
    overrides: tuple[str, ...] = field(default=())  # applied to every run first

    def __post_init__(self):
        names = [r.name for r in self.runs]
        if not names:
            raise ConfigError("the sweep has no runs.")
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep run names repeat: {sorted({n for n in names if names.count(n) > 1})}.")


def _shape_name(shape: dict) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in shape.items())


def isoflop_sweep(experiment: str, budgets: list[float], shapes: list[dict], overrides=()) -> Sweep:
    """An IsoFLOP grid: every model `shape` ({"model.d_model": 64, ...}) at every budget
    (train.budget_flops), so each budget's runs trace one IsoFLOP curve."""
    runs = [SweepRun(f"C{budget:.3g}-{_shape_name(shape)}".replace("+", ""),
                     tuple(f"{k}={v}" for k, v in shape.items()) + (f"train.budget_flops={budget!r}",))
            for budget, shape in itertools.product(budgets, shapes)]
    return Sweep(experiment, tuple(runs), tuple(overrides))


def grid_sweep(experiment: str, axes: dict[str, list], overrides=()) -> Sweep:
    """Every combination of the values of `axes` ({"optim.lr": [1e-3, 3e-3], ...})."""
    keys = list(axes)
    runs = [SweepRun(_shape_name(dict(zip(keys, values))), tuple(f"{k}={v}" for k, v in zip(keys, values)))
            for values in itertools.product(*axes.values())]
    return Sweep(experiment, tuple(runs), tuple(overrides))


def wsd_branches(experiment: str, shapes: list[dict], tokens: list[int], overrides=()) -> Sweep:
    """For every shape, WSD runs of each length in `tokens`, branched as cooldowns from one
    stable-phase trunk per shape (schedule "wsd" is set on all of them)."""
    runs = []
    for shape in shapes:
        base = tuple(f"{k}={v}" for k, v in shape.items()) + ("optim.schedule=wsd",)
        for count in sorted(tokens):
            runs.append(SweepRun(f"{_shape_name(shape)}-D{count}", base + (f"train.tokens={count}",),
                                 trunk=f"{_shape_name(shape)}-trunk"))
    return Sweep(experiment, tuple(runs), tuple(overrides))


def load_sweep(name: str) -> Sweep:
    """The Sweep defined by `sweep()` in experiments/NAME.py (or a .py path)."""
    module, path = load_experiment_module(name, f"unknown sweep {name!r} (a sweep is an experiments/*.py file "
                                                "defining sweep())")
    if not hasattr(module, "sweep"):
        raise ConfigError(f"{path} does not define sweep() -> Sweep.")
    return module.sweep()


def run_config(sweep: Sweep, run: SweepRun, sweep_dir: Path) -> Config:
    base = load_experiment(sweep.experiment)
    return override(base, [*sweep.overrides, *run.overrides, f"train.run_dir={sweep_dir / run.name}",
                           f"name={run.name}"])


def _is_finished(run_dir: Path) -> bool:
    return (run_dir / "result.json").is_file()


def run_sweep(sweep: Sweep, sweep_dir: Path, log=print, only: int | None = None) -> Path:
    """Run every unfinished run in order (WSD branches via their trunk) and return results.csv,
    or run only run number `only` (one SLURM job) and return its directory, leaving
    results.csv alone. All configs are built (and validated) before the first run starts."""
    from lmjax.runs import train  # with the weight transforms each run's config turns on

    if only is not None and not 0 <= only < len(sweep.runs):
        raise ConfigError(f"--only-index {only} is out of range: the sweep has {len(sweep.runs)} runs.")
    sweep_dir = Path(sweep_dir)
    configs = {run.name: run_config(sweep, run, sweep_dir) for run in sweep.runs}
    for cfg in configs.values():
        total_steps(cfg)  # a budget too small for one step fails here, before any training
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for run in sweep.runs if only is None else sweep.runs[only:only + 1]:
        run_dir, cfg = sweep_dir / run.name, configs[run.name]
        if _is_finished(run_dir):
            log(f"sweep: {run.name} finished already, skipped")
            continue
        if run.trunk is not None and not (run_dir / "checkpoints").exists():
            _grow_trunk(sweep, run, cfg, sweep_dir, configs, train, log)
        log(f"sweep: training {run.name}")
        summary = train(cfg, run_dir)
        if not summary["finished"]:
            log(f"sweep: {run.name} stopped at step {summary['step']}; run the sweep again to continue")
            break
        _write_result(cfg, run_dir, summary)
    return collect_results(sweep, sweep_dir) if only is None else sweep_dir / sweep.runs[only].name


def _grow_trunk(sweep, run, cfg, sweep_dir, configs, train, log) -> None:
    """Train `run.trunk` (a WSD run as long as the longest branch) up to where `run` starts
    decaying, then copy that step's checkpoint into `run`'s directory. The trunk keeps the
    checkpoint of every branch point (and saves no others), so a branch can start from it
    whichever branch grew the trunk further first."""
    branches = [r for r in sweep.runs if r.trunk == run.trunk]
    longest = max((configs[r.name] for r in branches), key=total_steps)
    trunk_dir = sweep_dir / run.trunk
    steps = total_steps(cfg)
    branch_step = cfg.optim.wsd_decay_start(steps)
    if branch_step == 0:
        return
    trunk_cfg = override(longest, [f"train.run_dir={trunk_dir}", f"train.halt_at_step={branch_step}",
                                   f"name={run.trunk}", "train.sample_tokens=0",
                                   f"train.keep_checkpoints={len(branches) + 1}",
                                   f"train.checkpoint_every={total_steps(longest)}"])
    saved = trunk_dir / "checkpoints" / str(branch_step)
    if not saved.is_dir():
        log(f"sweep: growing trunk {run.trunk} to step {branch_step} for {run.name}")
        train(trunk_cfg, trunk_dir)
    if not saved.is_dir():
        raise ConfigError(f"trunk {trunk_dir} has no checkpoint at step {branch_step}, where {run.name} branches "
                          "off (it was grown past it with other settings); delete the trunk and run the sweep again.")
    shutil.copytree(saved, sweep_dir / run.name / "checkpoints" / str(branch_step))
    for item in ("metrics.jsonl", "config.json"):  # records after the branch point are dropped on resume
        if (trunk_dir / item).is_file():
            shutil.copy2(trunk_dir / item, sweep_dir / run.name / item)


def _write_result(cfg: Config, run_dir: Path, summary: dict) -> None:
    counts = param_counts(cfg.model)
    steps = total_steps(cfg)
    tokens = steps * tokens_per_step(cfg)
    train_losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r and r.get("step") == steps]
    result = {
        "name": cfg.name,
        "N": counts["params_active_nonembedding"],
        "N_total": counts["params_total"],
        "D": tokens,
        "C": cfg.train.budget_flops or 6 * counts["params_active_nonembedding"] * tokens,
        "C_actual": run_flops_per_token(cfg) * tokens,
        "train_loss": train_losses[-1] if train_losses else float("nan"),
        "val_loss": summary["val_loss"],
        **({"G": cfg.model.moe.granularity} if cfg.model.moe.enabled else {}),
    }
    write_json_atomically(run_dir / "result.json", result)


def collect_results(sweep: Sweep, sweep_dir: Path) -> Path:
    """Write SWEEP_DIR/results.csv (atomically) from the finished runs' result.json files."""
    path = Path(sweep_dir) / "results.csv"
    files = [Path(sweep_dir) / run.name / "result.json" for run in sweep.runs]
    results = [json.loads(f.read_text()) for f in files if f.is_file()]
    table = io.StringIO()
    writer = csv.DictWriter(table, RESULT_COLUMNS + (("G",) if any("G" in r for r in results) else ()), restval="")
    writer.writeheader()
    writer.writerows(results)
    write_atomically(path, lambda f: f.write(table.getvalue().encode()))
    return path


SLURM_SUBMISSION = """#!/usr/bin/env bash
# Submits sweep {sweep} to SLURM: run this with bash (not sbatch) where `sbatch` works.
# One job per run (a job array; the WSD branches of one trunk as a chain of dependent jobs,
# shortest first, since each grows the trunk that the next continues), then one job that
# writes {sweep_dir}/results.csv once every run has finished. Resources come from sbatch's
# environment (SBATCH_PARTITION, SBATCH_TIMELIMIT, ...). Submitting again skips finished runs
# and resumes the others.
set -euo pipefail
mkdir -p {sweep_dir_q}
submit() {{ sbatch --parsable --job-name={job_name} "$@" | cut -d';' -f1; }}
after=""
"""


def slurm_script(sweep_name: str, sweep: Sweep, sweep_dir: Path, set_args: str = "") -> str:
    """A bash script that submits the sweep as SLURM jobs (see SLURM_SUBMISSION); `set_args`
    (" --set KEY=VALUE ...") is passed to every job's `lmjax sweep`."""
    import shlex

    command = f"lmjax sweep {shlex.quote(sweep_name)}{set_args} --dir {shlex.quote(str(sweep_dir))}"
    output = shlex.quote(str(Path(sweep_dir) / "slurm-%j.out"))
    lines = [SLURM_SUBMISSION.format(sweep=sweep_name, sweep_dir=sweep_dir, sweep_dir_q=shlex.quote(str(sweep_dir)),
                                     job_name=shlex.quote(f"lmjax-{Path(sweep_name).stem}"))]
    alone = [i for i, run in enumerate(sweep.runs) if run.trunk is None]
    if alone:
        array_output = shlex.quote(str(Path(sweep_dir) / "slurm-%A_%a.out"))
        lines.append(f"jobs=$(submit --array={','.join(map(str, alone))} --output={array_output} "
                     f"--wrap {shlex.quote(command + ' --only-index $SLURM_ARRAY_TASK_ID')})")
        lines.append('after="$after:$jobs"')
    for trunk in dict.fromkeys(run.trunk for run in sweep.runs if run.trunk):
        chain = sorted((i for i, run in enumerate(sweep.runs) if run.trunk == trunk),
                       key=lambda i: total_steps(run_config(sweep, sweep.runs[i], Path(sweep_dir))))
        lines.append("previous=\"\"")
        for i in chain:
            lines.append(f"previous=$(submit ${{previous:+--dependency=afterok:$previous}} --output={output} "
                         f"--wrap {shlex.quote(f'{command} --only-index {i}')})")
        lines.append('after="$after:$previous"')
    lines.append(f"collect=$(submit --dependency=afterok$after --output={output} "
                 f"--wrap {shlex.quote(command + ' --collect')})")
    lines.append(f'echo "submitted {len(sweep.runs)} runs; job $collect writes {Path(sweep_dir) / "results.csv"}"')
    return "\n".join(lines) + "\n"
