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

The granularity law (Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of
Experts", eq. 5), for sweeps whose results carry a granularity column G:
L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta, fitted exactly as Approach 3 (the
same Huber loss between log L_hat = logsumexp of the four terms and log L, L-BFGS from the
best points of a grid, the same bootstrap), with N and D as in the rest of the CSV. Its a, b
and c are not Approach 3's A, B and E: a and b multiply the same powers, but with G the
parameter term is split into a part that granularity removes (g / G^gamma) and one it does
not (a), and c is the loss no N, D or G reaches.

Confidence intervals: 2.5th and 97.5th percentiles over bootstrap resamples of the rows
(parametric refits start from the full-data optimum).
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
GRANULARITY_PARAMS = ("a", "alpha", "b", "beta", "g", "gamma", "c")
# Hoffmann et al. grid, thinned: alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1.5}, a, b in {0, 5, ..., 25}.
INIT_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
             "e": (-1.0, 0.0, 1.0), "a": (0.0, 5.0, 10.0, 20.0), "b": (0.0, 5.0, 10.0, 20.0)}
# The granularity law adds log g and gamma to Approach 3's grid (log g and log a start alike).
GRANULARITY_GRID = {"g": (0.0, 5.0, 10.0), "gamma": (0.25, 0.75)}


def read_results(path: Path, n_column="N", d_column="D", c_column="C", loss_column="val_loss",
                 g_column="G") -> dict[str, np.ndarray]:
    """Columns N, D, C, loss (float arrays) of a results CSV, and G (granularity; NaN where
    empty, such as dense runs) if it has that column. D may be missing if C is given
    (D = C / 6N) and C may be missing if D is given (C = 6 N D)."""
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
            return np.array([float(r[name] or "nan") for r in rows])
        except ValueError as e:
            raise ConfigError(f"{path}: column {name} has a non-numeric value ({e}).") from None

    n, loss = column(n_column), column(loss_column)
    d = column(d_column) if d_column in header else column(c_column) / (6 * n)
    c = column(c_column) if c_column in header else 6 * n * d
    keep = np.isfinite(loss)
    data = {"N": n[keep], "D": d[keep], "C": c[keep], "loss": loss[keep]}
    if g_column in header:
        data["G"] = column(g_column)[keep]
    return data


def _huber(r, delta=HUBER_DELTA):
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _huber_of_logsumexp(terms, jacobian, log_loss):
    """Summed Huber loss of log L_hat - log L with log L_hat = logsumexp over the log terms
    (K, M) of M points, and its gradient from jacobian (P, K, M) = d term / d theta_p."""
    log_pred = logsumexp(terms, axis=0)
    r = log_pred - log_loss
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    w = np.exp(terms - log_pred)  # softmax weights: d log_pred / d term
    return _huber(r).sum(), np.einsum("km,pkm->p", dr * w, jacobian)


def _objective(theta, log_n, log_d, log_loss):
    """Approach 3's objective and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    one, zero = np.ones_like(log_n), np.zeros_like(log_n)
    jacobian = np.array([[one, zero, zero], [zero, one, zero], [zero, zero, one],
                         [-log_n, zero, zero], [zero, -log_d, zero]])
    return _huber_of_logsumexp(terms, jacobian, log_loss)


def _granularity_objective(theta, log_n, log_d, log_g, log_loss):
    """The granularity law's objective and its gradient in (log g, log a, log b, log c, alpha,
    beta, gamma): log terms log g - gamma log G - alpha log N, log a - alpha log N,
    log b - beta log D and log c."""
    lg, la, lb, lc, alpha, beta, gamma = theta
    terms = np.stack([lg - gamma * log_g - alpha * log_n, la - alpha * log_n, lb - beta * log_d,
                      np.full_like(log_n, lc)])
    one, zero = np.ones_like(log_n), np.zeros_like(log_n)
    jacobian = np.array([[one, zero, zero, zero], [zero, one, zero, zero], [zero, zero, one, zero],
                         [zero, zero, zero, one], [-log_n, -log_n, zero, zero], [zero, zero, -log_d, zero],
                         [-log_g, zero, zero, zero]])
    return _huber_of_logsumexp(terms, jacobian, log_loss)


def _fit_parametric(columns: tuple, starts, objective=_objective, n_best: int = 12) -> np.ndarray:
    """Best L-BFGS optimum of `objective(theta, *columns)` from the `n_best` starts with the
    lowest initial objective."""
    starts = np.asarray(starts, float)
    if len(starts) > n_best:
        initial = [objective(s, *columns)[0] for s in starts]
        starts = starts[np.argsort(initial)[:n_best]]
    best, best_value = None, np.inf
    for start in starts:
        result = minimize(objective, start, args=columns, jac=True, method="L-BFGS-B",
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if result.fun < best_value:
            best, best_value = result.x, result.fun
    return best


def _bootstrap(columns: tuple, theta, objective, summary, keys, bootstrap: int, seed: int) -> dict:
    """95% intervals of `summary(theta)[key]` for `keys` over `bootstrap` refits of resampled
    rows, each started from the full-data optimum `theta`; {} without resamples."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        rows = rng.integers(0, len(columns[0]), len(columns[0]))
        samples.append(summary(_fit_parametric(tuple(c[rows] for c in columns), [theta], objective)))
    if not samples:
        return {}
    return {"ci95": {k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)] for k in keys}}


def _exp(x: float) -> float:
    """e^x, or inf where it overflows a float (a bootstrap refit that ran off to a degenerate
    optimum, whose interval is then unbounded on that side)."""
    return math.exp(x) if x < 709.0 else math.inf


def _approach3_summary(theta) -> dict:
    a, b, e, alpha, beta = theta
    A, B, E = _exp(a), _exp(b), _exp(e)
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
    columns = (np.log(data["N"]), np.log(data["D"]), np.log(data["loss"]))
    grid = [(a, b, e, alpha, beta) for alpha, beta, e, a, b in itertools.product(*INIT_GRID.values())]
    theta = _fit_parametric(columns, grid)
    return {**_approach3_summary(theta),
            **_bootstrap(columns, theta, _objective, _approach3_summary, ("A", "B", "E", "alpha", "beta", "a", "b"),
                         bootstrap, seed)}


def _granularity_summary(theta) -> dict:
    lg, la, lb, lc, alpha, beta, gamma = theta
    return {"a": _exp(la), "alpha": alpha, "b": _exp(lb), "beta": beta, "g": _exp(lg), "gamma": gamma, "c": _exp(lc)}


def fit_granularity(data: dict, bootstrap: int = 100, seed: int = 0) -> dict:
    """L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta by Approach 3's Huber/L-BFGS
    from a grid, over the rows with a granularity G (module docstring). Keys: a, alpha, b,
    beta, g, gamma, c, points, and ci95 (the same keys) with `bootstrap` > 0."""
    rows = np.isfinite(data.get("G", np.array([])))
    if len(np.unique(data["G"][rows]) if rows.any() else []) < 2:
        raise ConfigError("the granularity law needs results at 2 or more granularities (a G column with values).")
    if rows.sum() < len(GRANULARITY_PARAMS) + 1:
        raise ConfigError(f"the granularity law fits {len(GRANULARITY_PARAMS)} parameters and needs at least "
                          f"{len(GRANULARITY_PARAMS) + 1} results with a G, got {int(rows.sum())}.")
    columns = tuple(np.log(data[k][rows]) for k in ("N", "D", "G", "loss"))
    grid = [(lg, a, b, e, alpha, beta, gamma) for (alpha, beta, e, a, b), (lg, gamma)
            in itertools.product(itertools.product(*INIT_GRID.values()), itertools.product(*GRANULARITY_GRID.values()))]
    theta = _fit_parametric(columns, grid, _granularity_objective, n_best=6)
    return {**_granularity_summary(theta), "points": int(rows.sum()),
            **_bootstrap(columns, theta, _granularity_objective, _granularity_summary, GRANULARITY_PARAMS, bootstrap,
                         seed)}


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
    """Both approaches, and the granularity law when the data has a G column; a fit the data
    cannot support reports its reason as `error`."""
    fitted = {"points": len(data["loss"])}
    fits = [("approach2", fit_approach2), ("approach3", fit_approach3)]
    for name, fit in fits + ([("granularity", fit_granularity)] if "G" in data else []):
        try:
            fitted[name] = fit(data, bootstrap)
        except ConfigError as e:
            fitted[name] = {"error": str(e)}
    if all("error" in value for key, value in fitted.items() if key != "points"):
        raise ConfigError("no fit possible: " + " ".join(v["error"] for k, v in fitted.items() if k != "points"))
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
    if "granularity" in fitted:
        lines.append(_format_granularity(fitted["granularity"]))
    return "\n".join(lines)


def _format_granularity(f: dict) -> str:
    if "error" in f:
        return f"granularity: not fitted: {f['error']}"
    ci = f.get("ci95", {})
    law = "granularity ({points} results): L(N, D, G) = {c:.4g} + ({g:.4g} / G^{gamma:.3f} + {a:.4g}) / N^{alpha:.3f}" \
          " + {b:.4g} / D^{beta:.3f}".format(**f)
    return law + "".join(f"\n  {k}{_interval(ci, k)}" for k in GRANULARITY_PARAMS if k in ci)
