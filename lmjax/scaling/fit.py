"""Scaling-law fits to sweep results (Hoffmann et al. 2022, "Training Compute-Optimal LLMs").

Approach 2 (IsoFLOP profiles): for each compute budget C, fit a parabola of loss in log N;
its minimum is N_opt(C). D_opt(C) is the number of tokens the runs of that budget actually
trained at N_opt: log D interpolated linearly over log N between the two runs around N_opt
(not C / (6 N_opt): a run's FLOPs per token include embeddings, head and attention, so they
are not 6N). Power laws N_opt = G * C^a and D_opt = H * C^b are then fitted separately by
least squares in log-log. Budgets whose parabola has no minimum inside the sizes tried are
left out rather than extrapolated.

Approach 3 (parametric loss): L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising
the Huber loss (delta = 1e-3) between log L_hat and log L, with
log L_hat = logsumexp(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e),
by L-BFGS from a grid of initialisations, keeping the best (to stay fast, the objective
is evaluated on the whole grid and L-BFGS runs from its 12 best points). Implied
exponents: a = beta / (alpha + beta), b = alpha / (alpha + beta); the compute-optimal
frontier under C = 6 N D is N_opt = G (C/6)^a with G = (alpha A / (beta B))^(1/(alpha+beta)).

Confidence intervals: 2.5th and 97.5th percentiles over bootstrap resamples of the rows
(Approach 3 refits start from the full-data optimum).
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from lmjax.config import ConfigError

HUBER_DELTA = 1e-3
APPROACH3_PARAMS = ("A", "B", "E", "alpha", "beta")
# Hoffmann et al. grid, thinned: alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1.5}, a, b in {0, 5, ..., 25}.
INIT_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
             "e": (-1.0, 0.0, 1.0), "a": (0.0, 5.0, 10.0, 20.0), "b": (0.0, 5.0, 10.0, 20.0)}


def read_results(path: Path, n_column="N", d_column="D", c_column="C", loss_column="val_loss") -> dict[str, np.ndarray]:
    """Columns N, D, C, loss (float arrays) of a results CSV. D may be missing if C is
    given (D = C / 6N) and C may be missing if D is given (C = 6 N D)."""
    if not path.is_file():
        raise ConfigError(f"results file {path} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in (n_column, loss_column) if c not in header]
    if d_column not in header and c_column not in header:
        missing.append(f"{d_column} or {c_column}")
    if missing:
        raise ConfigError(f"{path} has no column(s) {', '.join(missing)} (columns: {', '.join(header)}); "
                          "name them with --n-column, --d-column, --c-column, --loss-column.")

    def column(name):
        try:
            return np.array([float(r[name]) for r in rows])
        except ValueError as e:
            raise ConfigError(f"{path}: column {name} has a non-numeric value ({e}).") from None

    n, loss = column(n_column), column(loss_column)
    d = column(d_column) if d_column in header else column(c_column) / (6 * n)
    c = column(c_column) if c_column in header else 6 * n * d
    keep = np.isfinite(loss)
    return {"N": n[keep], "D": d[keep], "C": c[keep], "loss": loss[keep]}


def _huber(r, delta=HUBER_DELTA):
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta, log_n, log_d, log_loss):
    """Summed Huber loss of log L_hat - log L, and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    log_pred = logsumexp(terms, axis=0)
    r = log_pred - log_loss
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    w = np.exp(terms - log_pred)  # softmax weights: d log_pred / d term
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
    return _huber(r).sum(), grad


def _fit_parametric(log_n, log_d, log_loss, starts, n_best: int = 12) -> np.ndarray:
    """Best L-BFGS optimum from the `n_best` starts with the lowest initial objective."""
    starts = np.asarray(starts, float)
    if len(starts) > n_best:
        initial = [_objective(s, log_n, log_d, log_loss)[0] for s in starts]
        starts = starts[np.argsort(initial)[:n_best]]
    best, best_value = None, np.inf
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if result.fun < best_value:
            best, best_value = result.x, result.fun
    return best


def _approach3_summary(theta) -> dict:
    a, b, e, alpha, beta = theta
    A, B, E = math.exp(a), math.exp(b), math.exp(e)
    exponent_n = beta / (alpha + beta)
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    # N_opt = g (C/6)^a  ->  coefficient in C: g * 6^-a
    return {"A": A, "B": B, "E": E, "alpha": alpha, "beta": beta, "a": exponent_n, "b": alpha / (alpha + beta),
            "n_opt": {"coefficient": g * 6.0 ** -exponent_n, "exponent": exponent_n}}


def fit_approach3(data: dict, bootstrap: int = 100, seed: int = 0) -> dict:
    """L(N, D) = E + A/N^alpha + B/D^beta by Huber/L-BFGS from a grid (module docstring)."""
    if len(data["loss"]) < len(APPROACH3_PARAMS) + 1:
        raise ConfigError(f"Approach 3 fits {len(APPROACH3_PARAMS)} parameters and needs at least "
                          f"{len(APPROACH3_PARAMS) + 1} results, got {len(data['loss'])}.")
    log_n, log_d, log_loss = np.log(data["N"]), np.log(data["D"]), np.log(data["loss"])
    grid = [(a, b, e, alpha, beta) for alpha, beta, e, a, b in itertools.product(*INIT_GRID.values())]
    theta = _fit_parametric(log_n, log_d, log_loss, grid)
    result = _approach3_summary(theta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        rows = rng.integers(0, len(log_n), len(log_n))
        samples.append(_approach3_summary(_fit_parametric(log_n[rows], log_d[rows], log_loss[rows], [theta])))
    if samples:
        result["ci95"] = {k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
                          for k in ("A", "B", "E", "alpha", "beta", "a", "b")}
    return result


def _isoflop_minima(data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """(budgets, N_opt, D_opt, parabola) per budget, for the budgets with >= 3 distinct sizes
    whose parabola has its minimum inside the sizes tried (no extrapolated minima). D_opt is
    the trained tokens at N_opt: log D interpolated over log N (module docstring)."""
    budgets, n_minima, d_minima, parabolas = [], [], [], []
    for c in np.unique(data["C"]):
        at = data["C"] == c
        log_n = np.log(data["N"][at])
        if len(np.unique(log_n)) < 3:
            continue
        coefficients = np.polyfit(log_n, data["loss"][at], 2)
        if coefficients[0] <= 0:  # no minimum: the curve bends the wrong way
            continue
        log_n_opt = -coefficients[1] / (2 * coefficients[0])
        if not log_n.min() <= log_n_opt <= log_n.max():
            continue
        order = np.argsort(log_n)
        budgets.append(c)
        n_minima.append(math.exp(log_n_opt))
        d_minima.append(math.exp(np.interp(log_n_opt, log_n[order], np.log(data["D"][at])[order])))
        parabolas.append({"C": float(c), "coefficients": coefficients.tolist()})
    return np.array(budgets), np.array(n_minima), np.array(d_minima), parabolas


def _power_law(budgets, values) -> tuple[float, float]:
    """(exponent, coefficient) of values = coefficient * budgets^exponent, least squares in log-log."""
    exponent, log_coefficient = np.polyfit(np.log(budgets), np.log(values), 1)
    return float(exponent), float(math.exp(log_coefficient))


def fit_approach2(data: dict, bootstrap: int = 100, seed: int = 0) -> dict:
    """N_opt(C) = G C^a and D_opt(C) = H C^b from IsoFLOP parabola minima, D_opt the tokens
    the runs trained at N_opt (module docstring)."""
    budgets, n_minima, d_minima, parabolas = _isoflop_minima(data)
    if len(budgets) < 2:
        raise ConfigError(f"Approach 2 needs at least 2 compute budgets with >= 3 model sizes and a loss minimum "
                          f"inside the sizes tried; found {len(budgets)}.")
    (a, g), (b, h) = _power_law(budgets, n_minima), _power_law(budgets, d_minima)
    result = {"a": a, "b": b, "n_opt": {"coefficient": g, "exponent": a}, "d_opt": {"coefficient": h, "exponent": b},
              "minima": [{"C": float(c), "N_opt": float(n), "D_opt": float(d)}
                         for c, n, d in zip(budgets, n_minima, d_minima)],
              "parabolas": parabolas}
    rng = np.random.default_rng(seed)
    exponents = []
    for _ in range(bootstrap):
        rows = rng.integers(0, len(data["loss"]), len(data["loss"]))
        c, n, d, _ = _isoflop_minima({k: v[rows] for k, v in data.items()})
        if len(c) >= 2:
            exponents.append((_power_law(c, n)[0], _power_law(c, d)[0]))
    if exponents:
        result["ci95"] = {name: np.percentile(column, [2.5, 97.5]).tolist()
                          for name, column in zip(("a", "b"), np.array(exponents).T)}
    return result


def fit_results(data: dict, bootstrap: int = 100) -> dict:
    """Both approaches; an approach the data cannot support reports its reason as `error`."""
    fitted = {"points": len(data["loss"])}
    for name, fit in (("approach2", fit_approach2), ("approach3", fit_approach3)):
        try:
            fitted[name] = fit(data, bootstrap)
        except ConfigError as e:
            fitted[name] = {"error": str(e)}
    if all("error" in fitted[k] for k in ("approach2", "approach3")):
        raise ConfigError(f"no fit possible: {fitted['approach2']['error']} {fitted['approach3']['error']}")
    return fitted


def _interval(ci: dict, key: str) -> str:
    return f"  [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else ""


def format_fit(fitted: dict) -> str:
    """Human-readable summary of `fit_results` for `lmjax fit`."""
    lines = [f"{fitted['points']} results"]
    for name in ("approach2", "approach3"):
        f = fitted[name]
        if "error" in f:
            lines.append(f"{name}: not fitted: {f['error']}")
            continue
        ci = f.get("ci95", {})
        lines.append(f"{name}: N_opt = {f['n_opt']['coefficient']:.4g} * C^{f['a']:.3f}{_interval(ci, 'a')}   "
                     f"D_opt ~ C^{f['b']:.3f}{_interval(ci, 'b')}")
        if name == "approach3":
            lines.append("  L(N, D) = {E:.4g} + {A:.4g} / N^{alpha:.3f} + {B:.4g} / D^{beta:.3f}".format(**f)
                         + (f"   alpha{_interval(ci, 'alpha')} beta{_interval(ci, 'beta')}" if ci else ""))
    return "\n".join(lines)
