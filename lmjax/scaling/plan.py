"""Size a run by compute: counts, FLOPs, memory, Chinchilla-optimal N and D, steps, wall time.

Compute-optimal size for a budget of C training FLOPs, with C = 6 N D:
- rule of thumb (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"):
  D = 20 N, so N_opt = sqrt(C / 120) and D_opt = 20 N_opt;
- or a fitted law (the JSON of `lmjax fit --json`): N_opt = G * C^a, D_opt = C / (6 N_opt).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmjax.config import Config, ConfigError, ModelConfig
from lmjax.families import family_of
from lmjax.hardware import PEAK_FLOPS
from lmjax.scaling.counting import (
    example_lengths,
    forward_flops_per_token,
    param_counts,
    router_params,
    run_flops_per_token,
    to_petaflop_days,
    tokens_per_step,
    total_steps,
)
from lmjax.scaling.memory import memory_estimate

TOKENS_PER_PARAM = 20  # Chinchilla rule of thumb


def chinchilla_optimal(budget_flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N_opt, D_opt) with C = 6 N D and D = tokens_per_param * N."""
    n = math.sqrt(budget_flops / (6 * tokens_per_param))
    return n, tokens_per_param * n


def law_optimal(budget_flops: float, law: dict) -> tuple[float, float]:
    """(N_opt, D_opt) from a fitted law {"n_opt": {"coefficient": G, "exponent": a}}."""
    try:
        n = law["n_opt"]["coefficient"] * budget_flops ** law["n_opt"]["exponent"]
    except (KeyError, TypeError):
        raise ConfigError("the law file has no n_opt {coefficient, exponent}; write it with `lmjax fit --json`.")
    return n, budget_flops / (6 * n)


def load_law(path: str | Path) -> dict:
    """A fitted law written by `lmjax fit --json` (approach 3 preferred, else approach 2)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--law {path}: no such file; write one with `lmjax fit RESULTS.csv --json > law.json`.")
    fitted = json.loads(path.read_text())
    for approach in ("approach3", "approach2"):
        if approach in fitted and "n_opt" in fitted[approach]:
            return fitted[approach]
    return fitted


def peak_flops(hardware: str, dtype: str) -> float:
    """Dense peak FLOP/s of one device of the named hardware (lmjax.hardware.PEAK_FLOPS)."""
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() == hardware.lower():
            return peaks[dtype]
    raise ConfigError(f"unknown hardware {hardware!r}; known: {', '.join(PEAK_FLOPS)}.")


def plan(cfg: Config, budget_flops: float | None = None, law: dict | None = None, hardware: str = "H100",
         mfu: float = 0.4, n_devices: int = 1, adapter_bytes: float = 0,
         int8_bytes: tuple[float, float] | None = None) -> dict:
    """Everything `lmjax plan` prints, as a flat dict of numbers (see docs/scaling.md).

    With `budget_flops` the run is sized by it (as train.budget_flops would); otherwise by
    the config's own run length, if it has one. With pipeline stages (mesh.pipeline over
    `n_devices`), the wall time is that of the useful work over 1 - the bubble fraction.
    `adapter_bytes` and `int8_bytes`: the weight transforms' sizes, as `memory_estimate` takes them.
    """
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}.")
    if n_devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {n_devices}.")
    counts = param_counts(cfg.model)
    stages = cfg.mesh.axis_sizes(n_devices)["pipeline"]
    bubble = cfg.mesh.bubble_fraction(stages)
    flops_per_token = run_flops_per_token(cfg)
    step_tokens = tokens_per_step(cfg)
    result = {
        "parametrization": cfg.model.parametrization,
        **({"mup_width_multiplier": cfg.model.width_multiplier} if cfg.model.parametrization == "mup" else {}),
        "logit_multiplier": cfg.model.logit_multiplier,
        "embedding_multiplier": cfg.model.embedding_multiplier,
        "attention_multiplier": cfg.model.attention_multiplier,
        "init_std_input": cfg.model.input_init_std,
        "init_std_hidden": cfg.model.hidden_init_std,  # under mup: at this width
        "init_std_output": cfg.model.output_init_std,
        "adam_eps": cfg.optim.eps * cfg.model.adam_eps_multiplier,  # under mup with mup_scale_adam_eps: at this width
        **counts,
        **_moe_shape(cfg),
        "flops_per_token_train": flops_per_token,
        "flops_per_token_forward": forward_flops_per_token(cfg.model, *example_lengths(cfg)),
        **memory_estimate(cfg, n_devices, adapter_bytes=adapter_bytes, int8_bytes=int8_bytes),
        **({"pipeline_stages": stages, "pipeline_microbatches": cfg.mesh.microbatches(stages),
            "pipeline_bubble_fraction": bubble} if stages > 1 else {}),
        "chinchilla_tokens": TOKENS_PER_PARAM * counts["params_total"],
        "tokens_per_step": step_tokens,
    }
    if budget_flops is not None:
        cfg = _with_budget(cfg, budget_flops)
    has_length = any(getattr(cfg.train, k) is not None for k in ("steps", "tokens", "budget_flops"))
    if has_length:
        steps = total_steps(cfg)
        compute = budget_flops if budget_flops is not None else steps * step_tokens * flops_per_token
        result.update({"steps": steps, "tokens": steps * step_tokens, "compute_flops": compute,
                       "compute_pfdays": to_petaflop_days(compute)})
        if budget_flops is not None:
            n_opt, d_opt = law_optimal(budget_flops, law) if law else chinchilla_optimal(budget_flops)
            result.update({"compute_optimal_params": n_opt, "compute_optimal_tokens": d_opt,
                           "compute_optimal_steps": math.floor(d_opt / step_tokens)})
        peak = peak_flops(hardware, cfg.model.dtype) * n_devices
        result.update({"hardware": hardware, "devices": n_devices, "mfu": mfu,
                       "wall_seconds": compute / (mfu * peak * (1 - bubble))})
    return result


def _moe_shape(cfg: Config) -> dict:
    """For a MoE model: its granularity G and the routers' share of the active parameters."""
    m = cfg.model
    if not m.moe.enabled:
        return {}
    routers = sum(router_params(m) for stack in family_of(m).stacks(m) for i in range(stack.n_layers)
                  if m.is_moe_layer(i))
    return {"moe_granularity": m.moe.granularity,
            "moe_router_share_of_active": routers / param_counts(m)["params_active"]}


def shape_notes(m: ModelConfig) -> list[str]:
    """Lines warning of a shape no published model has, as widening an experiment with
    `--set model.d_model` alone makes: heads wider than 256, or a feed-forward narrower than
    d_model (LLaMA: heads of 128, d_ff about 2.7 d_model)."""
    notes = []
    if m.head_dim > 256:
        notes.append(f"heads of width {m.head_dim} (model.n_heads={m.n_heads} at model.d_model={m.d_model}); "
                     f"published models use 64-128: set model.n_heads (and model.n_kv_heads) with model.d_model.")
    if m.d_ff < m.d_model:
        notes.append(f"model.d_ff={m.d_ff} is narrower than model.d_model={m.d_model} (LLaMA: about 2.7x); set "
                     "model.d_ff with model.d_model, or plan a named shape such as `lmjax plan llama2_7b`.")
    return notes


def _with_budget(cfg: Config, budget_flops: float) -> Config:
    from lmjax.config_parse import override

    return override(cfg, [f"train.budget_flops={budget_flops!r}"])


def format_plan(result: dict) -> str:
    """Human-readable lines for `lmjax plan`."""
    def number(x):
        return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"

    def size(b):
        return f"{b / 2**30:.3f} GiB" if b >= 2**27 else f"{b / 2**20:.3f} MiB"

    lines = []
    for key, value in result.items():
        if key.startswith(("memory_", "kv_cache_", "context_comm_")):
            text = size(value)
        elif key == "wall_seconds":
            text = f"{value:,.0f} s ({value / 3600:.2f} h, {value / 86400:.2f} days)"
        else:
            text = value if isinstance(value, str) else number(value)
        lines.append(f"{key:<30} {text}")
    return "\n".join(lines)
