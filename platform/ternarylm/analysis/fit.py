"""Scaling-law fits of final validation loss, following Chinchilla approach 3.

Forms:
    L(N)    = E + A * N^-alpha                    (one token budget)
    L(N, D) = E + A * N^-alpha + B * D^-beta      (token budgets vary)

and the precision-aware joint form over several precision plans (Kumar et al. 2024, "Scaling
Laws for Precision": a plan acts as if the model had N_eff = N * f_plan parameters):
    L(N, [D,] plan) = E + A * (N * f_plan)^-alpha [+ B * D^-beta],   f_reference = 1

The fit works on log-parameters e = log E, a = log A, b = log B: the predicted
log-loss is logsumexp(a - alpha*log N, b - beta*log D, e), residuals are taken
against log L, and a Huber loss (delta 1e-3) of the residuals is minimised with
L-BFGS-B from a grid of starts, keeping the best. In the joint form each plan but the
reference adds g = log f, bounded to f in (0, 1], which shifts its points along log N.

Intervals are 95% percentile bootstrap intervals that keep the design (every N, D and plan stays;
resampling model sizes would measure the spread of the design, not of training): the seeds of a
cell (the rows sharing N, D and plan) are the unit of noise.
  * `seeds`, every cell has 3 or more seeds: each draw resamples every cell's seeds from its own.
  * `parametric`, otherwise (one seed per cell, above all): each draw is the fitted law plus
    Gaussian noise in log loss, the noise sd taken from the residuals (needs 2 or more residual
    degrees of freedom).
Both draw the noise scale too, as the noise is measured from few seeds or residuals. Seed draws
hold the seeds' noise only, not a misfit of the law (the residuals and holdout_check show that).
Every draw is refitted from several starts (the full-data optimum and the draw's best grid
points). No draw is redrawn or dropped: draws whose refit converged from no start stay in the
intervals, and their share is reported (`boot_failed`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats
from threadpoolctl import threadpool_limits

from ternarylm.core.errors import UserError

HUBER_DELTA = 1e-3

# Start grid. `a` and `b` are expressed at the geometric-mean N and D (see
# _Problem), so their grid is a share of the observed loss, whatever the units.
_E_SHARES = (0.2, 0.5, 0.8, 0.95)  # E as a share of the lowest observed loss
_TERM_SHARES = (0.02, 0.1, 0.3, 0.7)  # a power-law term as a share of the median loss
_EXPONENTS = (0.05, 0.2, 0.4, 0.7, 1.2)
_PLAN_LOG_STARTS = (0.0, -1.0, -3.0)  # log f shared by every non-reference plan: f 1, 0.37, 0.05
# L-BFGS runs only from the best grid points: the L(N,D) grid has 1600 of them,
# and the vectorised objective ranks them all in one call.
_N_STARTS = 16
# A bootstrap refit starts from the full-data optimum and this many of its draw's best grid
# points: a draw far from the data can have its optimum in another basin.
_BOOT_GRID_STARTS = 3
_LOG_BOUNDS = (-50.0, 50.0)
_EXPONENT_BOUNDS = (0.0, 5.0)  # a negative exponent would make loss grow with scale
# log f: f in (0, 1], so the reference plan should be the most precise one (fp).
_PLAN_LOG_BOUNDS = (-20.0, 0.0)
_LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10}
# Parametric draws estimate the noise from the residuals: 1 degree of freedom cannot.
_MIN_NOISE_DOF = 2
# Resampling 2 seeds gives a cell's mean 3 possible values, too coarse: with 5 cells of 2 seeds
# the intervals covered E, A and alpha in 82-85% of 40 data sets for a nominal 95%, parametric
# draws on the same data in 88-93%.
_MIN_SEEDS_PER_CELL = 3

_GROUP_COLUMNS = ("scheme", "plan")


def plan_label(scheme: str | None, plan: str) -> str:
    """How results name a plan: `scheme/plan`, or the plan alone where no layer is ternary
    (results mark the scheme `-` there, e.g. fp, int8, int4)."""
    return plan if scheme in (None, "", "-") else f"{scheme}/{plan}"


class FitError(UserError):
    """The data cannot support the requested fit; the message says how to fix it."""


@dataclass
class ScalingFit:
    form: str  # "L(N)" or "L(N,D)"
    params: dict[str, float]  # E, A, alpha (and B, beta)
    ci: dict[str, tuple[float, float]]  # 95% bootstrap intervals; empty when n_boot=0
    n_points: int
    objective: float  # summed Huber loss of the log residuals at the optimum
    ci_note: str | None = None  # why `ci` is empty although intervals were asked for
    ci_method: str | None = None  # "seeds" or "parametric" (module docstring), with `ci`
    boot_failed: float | None = None  # share of bootstrap refits that converged from no start

    def predict(self, N: ArrayLike, D: ArrayLike | None = None) -> np.ndarray:
        """Predicted loss at model size N (and token budget D for the L(N,D) form)."""
        p = self.params
        loss = p["E"] + p["A"] * np.asarray(N, dtype=float) ** -p["alpha"]
        if self.form == "L(N,D)":
            if D is None:
                raise ValueError("this L(N,D) fit needs D (training tokens) to predict")
            loss = loss + p["B"] * np.asarray(D, dtype=float) ** -p["beta"]
        return np.asarray(loss)

    def to_json(self) -> dict:
        return {
            "form": self.form,
            **{k: float(v) for k, v in self.params.items()},
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
            "n_points": int(self.n_points),
            "objective": float(self.objective),
            **_interval_json(self.ci_note, self.ci_method, self.boot_failed),
        }


def _interval_json(note: str | None, method: str | None, failed: float | None) -> dict:
    """How the intervals were made (or why there are none), for to_json."""
    if note:
        return {"ci_note": note}
    return {} if method is None else {"ci_method": method, "boot_failed": failed}


@dataclass(frozen=True)
class _Problem:
    """Log-space data. log N and log D are centred on their means so that `a`
    and `alpha` are not nearly collinear (log N sits around 11-23), which
    keeps L-BFGS well conditioned; _natural_params undoes the shift."""

    x: np.ndarray  # log N - x_ref
    y: np.ndarray | None  # log D - y_ref, None for L(N)
    log_loss: np.ndarray
    x_ref: float
    y_ref: float
    plan: np.ndarray | None = None  # index into `plans` per point (0: the reference), joint form
    plans: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, N: np.ndarray, loss: np.ndarray, D: np.ndarray | None,
                  plan: np.ndarray | None = None, plans: tuple[str, ...] = ()) -> _Problem:
        x = np.log(N)
        y = None if D is None else np.log(D)
        x_ref = float(x.mean())
        y_ref = 0.0 if y is None else float(y.mean())
        return cls(x - x_ref, None if y is None else y - y_ref, np.log(loss), x_ref, y_ref,
                   plan, plans)

    @property
    def n_base(self) -> int:
        """Parameters of the law without plans: 3 for L(N), 5 for L(N,D)."""
        return 3 if self.y is None else 5

    @property
    def names(self) -> tuple[str, ...]:
        base = ("E", "A", "alpha") if self.y is None else ("E", "A", "alpha", "B", "beta")
        return base + tuple(f"f[{p}]" for p in self.plans[1:])


def _plan_shift(theta: np.ndarray, prob: _Problem) -> np.ndarray | float:
    """log f of each point's plan, (..., n); 0 without plans."""
    if prob.plan is None:
        return 0.0
    g = theta[..., prob.n_base:]
    g = np.concatenate([np.zeros(g.shape[:-1] + (1,)), g], axis=-1)  # the reference: f = 1
    return np.take(g, prob.plan, axis=-1)


def _log_terms(theta: np.ndarray, prob: _Problem) -> np.ndarray:
    """The logs of E, A*N^-alpha (and B*D^-beta); theta (..., p) -> (..., k, n)."""
    e, a, alpha = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
    x = prob.x + _plan_shift(theta, prob)  # log N_eff, centred
    terms = [np.broadcast_to(e, e.shape[:-1] + prob.x.shape), a - alpha * x]
    if prob.y is not None:
        b, beta = theta[..., 3:4], theta[..., 4:5]
        terms.append(b - beta * prob.y)
    return np.stack(terms, axis=-2)


def _logsumexp(terms: np.ndarray, axis: int) -> np.ndarray:
    """Stable log-sum-exp: scipy's costs ~60 us a call, most of a small fit's objective."""
    m = terms.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(terms - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _grid_objective(thetas: np.ndarray, prob: _Problem) -> np.ndarray:
    pred = _logsumexp(_log_terms(thetas, prob), axis=-2)
    return special.huber(HUBER_DELTA, pred - prob.log_loss).sum(axis=-1)


def _objective(theta: np.ndarray, prob: _Problem) -> tuple[float, np.ndarray]:
    """Huber objective and its analytic gradient, both divided by delta:
    L-BFGS-B's ftol is relative to max(|f|, 1), so on the raw objective (~1e-5)
    it would stop short of the optimum."""
    terms = _log_terms(theta, prob)
    pred = _logsumexp(terms, axis=0)
    r = pred - prob.log_loss
    # d pred / d term is the softmax weight of the term; Huber'(r) = clip(r).
    g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) * np.exp(terms - pred)
    grad = [g[0].sum(), g[1].sum(), -(g[1] * (prob.x + _plan_shift(theta, prob))).sum()]
    if prob.y is not None:
        grad += [g[2].sum(), -(g[2] * prob.y).sum()]
    if prob.plan is not None:  # d/d log f_j = -alpha * (the N-term weights of plan j's points)
        per_plan = np.bincount(prob.plan, weights=g[1], minlength=len(prob.plans))
        grad += list(-theta[2] * per_plan[1:])
    f = special.huber(HUBER_DELTA, r).sum()
    return f / HUBER_DELTA, np.array(grad) / HUBER_DELTA


def _bounds(prob: _Problem) -> list[tuple[float, float]]:
    per_term = [_LOG_BOUNDS, _EXPONENT_BOUNDS]
    plans = [_PLAN_LOG_BOUNDS] * max(0, len(prob.plans) - 1)
    return [_LOG_BOUNDS] + per_term * (1 if prob.y is None else 2) + plans


def _start_grid(prob: _Problem) -> np.ndarray:
    loss_min = np.exp(prob.log_loss.min())
    loss_mid = np.exp(np.median(prob.log_loss))
    term = np.log(loss_mid * np.array(_TERM_SHARES))
    axes = [np.log(loss_min * np.array(_E_SHARES)), term, np.array(_EXPONENTS)]
    if prob.y is not None:
        axes += [term, np.array(_EXPONENTS)]
    n_shifts = max(0, len(prob.plans) - 1)
    if n_shifts:
        axes.append(np.array(_PLAN_LOG_STARTS))
    mesh = np.meshgrid(*axes, indexing="ij")
    grid = np.stack([m.ravel() for m in mesh], axis=1)
    if n_shifts:  # one shared start value for every plan's log f
        grid = np.concatenate([grid, np.repeat(grid[:, -1:], n_shifts - 1, axis=1)], axis=1)
    return grid


def _minimise(prob: _Problem, starts: Sequence[np.ndarray]) -> tuple[np.ndarray, float, bool]:
    """Best L-BFGS-B optimum over the starts: (theta, raw Huber objective, whether any start
    converged)."""
    bounds = _bounds(prob)
    results = [
        optimize.minimize(
            _objective, s, args=(prob,), jac=True, method="L-BFGS-B",
            bounds=bounds, options=_LBFGS_OPTIONS,
        )
        for s in starts
    ]
    best = min(results, key=lambda res: res.fun)
    return best.x, float(best.fun) * HUBER_DELTA, any(r.success for r in results)


def _best_starts(prob: _Problem, k: int) -> np.ndarray:
    """The k grid points with the lowest objective, (k, p)."""
    grid = _start_grid(prob)
    return grid[np.argsort(_grid_objective(grid, prob), kind="stable")[:k]]


def _natural_params(theta: np.ndarray, prob: _Problem) -> np.ndarray:
    """(e, a, alpha[, b, beta]) in centred coordinates -> (E, A, alpha[, B, beta])."""
    out = [np.exp(theta[0]), np.exp(theta[1] + theta[2] * prob.x_ref), theta[2]]
    if prob.y is not None:
        out += [np.exp(theta[3] + theta[4] * prob.y_ref), theta[4]]
    out += list(np.exp(theta[prob.n_base:]))
    return np.array(out)


def _shortage(prob: _Problem) -> str | None:
    """Why these points cannot determine the fit, or None when they can."""
    n_N = len(np.unique(prob.x))
    if prob.y is None:
        if n_N < 4:
            return (
                f"L(N) has 3 parameters and needs at least 4 distinct N values, got {n_N}; "
                "add runs at more model sizes"
            )
    else:
        n_D = len(np.unique(prob.y))
        if n_N < 3 or n_D < 3:
            return (
                "L(N,D) needs at least 3 distinct N and 3 distinct D values to separate the two "
                f"power laws, got {n_N} N and {n_D} D; add runs at more model sizes and token "
                "budgets"
            )
        n_pairs = len(np.unique(np.stack([prob.x, prob.y], axis=1), axis=0))
        if n_pairs < 6:
            return (
                f"L(N,D) has 5 parameters and needs at least 6 distinct (N, D) points, got "
                f"{n_pairs}; add runs"
            )
    if prob.plan is None:
        return None
    missing = [p for i, p in enumerate(prob.plans) if not np.any(prob.plan == i)]
    if missing:
        return f"plan(s) {', '.join(missing)} have no points; every plan needs runs"
    n_points = len(np.unique(_point_rows(prob), axis=0))
    n_params = len(prob.names)
    if n_points <= n_params:
        return (
            f"the joint law over {len(prob.plans)} plans has {n_params} parameters and needs at "
            f"least {n_params + 1} distinct (plan, N, D) points, got {n_points}; add runs"
        )
    return None


def _point_rows(prob: _Problem) -> np.ndarray:
    """One row per point: what makes two points the same point (N, D and plan)."""
    cols = [prob.x] + ([] if prob.y is None else [prob.y])
    cols += [] if prob.plan is None else [prob.plan.astype(float)]
    return np.stack(cols, axis=1)


def _cells(prob: _Problem) -> np.ndarray:
    """Each point's cell, an index into the distinct (N, D, plan): the rows of a cell are seeds."""
    return np.unique(_point_rows(prob), axis=0, return_inverse=True)[1].ravel()


def _residuals(theta: np.ndarray, prob: _Problem) -> np.ndarray:
    """Predicted minus observed log loss per point."""
    return _logsumexp(_log_terms(theta, prob), axis=0) - prob.log_loss


def _noise_scales(dof: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, 1) factors sqrt(dof / chi2(dof)) on the measured noise sd, one per draw.

    The noise sd is measured from few degrees of freedom (seeds, or residuals), so it is itself
    uncertain; draws at the measured sd alone would give normal-width intervals where t-width
    ones are due (for a linear law with Gaussian noise these factors give the t-interval
    exactly)."""
    return np.sqrt(dof / rng.chisquare(dof, size=(n_boot, 1)))


def _seed_draws(prob: _Problem, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) log losses: every cell's seeds drawn with replacement from its own seeds.

    Deviations from the cell's mean are scaled by sqrt(n_c / (n_c - 1)), since plain resampling
    of n_c seeds gives their mean (n_c - 1) / n_c of the variance a mean of n_c new seeds has
    (half for two seeds), and by the draw's noise scale (degrees of freedom: seeds - cells)."""
    cells = _cells(prob)
    noise = _noise_scales(len(cells) - cells.max() - 1, n_boot, rng)
    out = np.empty((n_boot, len(cells)))
    for c in range(cells.max() + 1):
        rows = np.flatnonzero(cells == c)
        y = prob.log_loss[rows]
        deviation = rng.choice(y, size=(n_boot, len(rows))) - y.mean()
        out[:, rows] = y.mean() + np.sqrt(len(rows) / (len(rows) - 1)) * noise * deviation
    return out


def _parametric_draws(prob: _Problem, theta: np.ndarray, n_boot: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) log losses: the fitted law plus Gaussian noise at the residuals' sd s times
    the draw's noise scale (degrees of freedom: points - parameters)."""
    r = _residuals(theta, prob)
    dof = len(r) - len(theta)
    sd = np.sqrt(np.sum(r**2) / dof) * _noise_scales(dof, n_boot, rng)
    return prob.log_loss + r + sd * rng.standard_normal((n_boot, len(r)))


def _no_interval_reason(prob: _Problem, theta: np.ndarray) -> str | None:
    """Why the bootstrap cannot make intervals from these points, or None when it can."""
    if _method(prob) == "seeds":
        cells = _cells(prob)
        distinct = np.unique(np.stack([cells, prob.log_loss], axis=1), axis=0)
        if len(distinct) == cells.max() + 1:
            return ("no intervals: every cell's seeds have the same loss, so resampling seeds "
                    "cannot move the fit")
        return None
    dof = len(prob.x) - len(theta)
    if dof < _MIN_NOISE_DOF:
        return (f"no intervals: with fewer than {_MIN_SEEDS_PER_CELL} seeds in some cell the "
                f"noise is measured by the residuals, and {len(prob.x)} points for "
                f"{len(theta)} parameters leave {dof} degree(s) of freedom ({_MIN_NOISE_DOF} "
                f"needed); run {_MIN_SEEDS_PER_CELL} or more seeds in every cell, or more sizes")
    return None


def _method(prob: _Problem) -> str:
    """How the bootstrap draws these points (module docstring)."""
    return "seeds" if np.all(np.bincount(_cells(prob)) >= _MIN_SEEDS_PER_CELL) else "parametric"


@dataclass
class _Draws:
    samples: np.ndarray  # natural parameters of the refits, (n_boot, p)
    failed: float  # share of refits that converged from no start (kept in `samples`)
    method: str  # "seeds" or "parametric"


def _bootstrap(prob: _Problem, theta0: np.ndarray, n_boot: int, seed: int) -> _Draws:
    """Refits on n_boot draws of the log losses at the data's own points (module docstring)."""
    rng = np.random.default_rng(seed)
    method = _method(prob)
    draws = (_seed_draws(prob, n_boot, rng) if method == "seeds"
             else _parametric_draws(prob, theta0, n_boot, rng))
    samples, failed = [], 0
    for log_loss in draws:
        sub = replace(prob, log_loss=log_loss)
        theta, _, converged = _minimise(sub, [theta0, *_best_starts(sub, _BOOT_GRID_STARTS)])
        samples.append(_natural_params(theta, sub))
        failed += not converged
    return _Draws(np.array(samples), failed / n_boot, method)


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise FitError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise FitError(f"{name} must hold positive finite numbers; drop or fix the other rows")
    return arr


def _inputs(
    N: ArrayLike, loss: ArrayLike, D: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    N_arr, loss_arr = _as_array(N, "N"), _as_array(loss, "loss")
    D_arr = None if D is None else _as_array(D, "D")
    lengths = {len(N_arr), len(loss_arr)} | ({len(D_arr)} if D_arr is not None else set())
    if len(lengths) != 1:
        raise FitError(f"N, loss (and D) must have the same length, got lengths {sorted(lengths)}")
    return N_arr, loss_arr, D_arr


@dataclass
class _Solution:
    theta: np.ndarray  # centred log-space optimum
    objective: float
    draws: _Draws | None  # the bootstrap's; None when n_boot=0 or `ci_note` says why not
    ci_note: str | None

    def ci(self, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        if self.draws is None:
            return {}
        lo, hi = np.percentile(self.draws.samples, [2.5, 97.5], axis=0)
        return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(names)}

    @property
    def samples(self) -> np.ndarray | None:
        return None if self.draws is None else self.draws.samples

    @property
    def interval_fields(self) -> dict[str, Any]:
        """ci_note, ci_method and boot_failed, as the fit results hold them."""
        return {"ci_note": self.ci_note,
                "ci_method": None if self.draws is None else self.draws.method,
                "boot_failed": None if self.draws is None else self.draws.failed}


def _solve(prob: _Problem, n_boot: int, seed: int) -> _Solution:
    """Multi-start fit of a checked problem, then its bootstrap (n_boot=0: none)."""
    if (msg := _shortage(prob)) is not None:
        raise FitError(msg)
    # L-BFGS-B calls BLAS on 3x3..5x5 problems thousands of times; OpenBLAS
    # threads there slow the fit ~10x on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        theta, objective, _ = _minimise(prob, list(_best_starts(prob, _N_STARTS)))
        if not n_boot:
            return _Solution(theta, objective, None, None)
        if (note := _no_interval_reason(prob, theta)) is not None:
            return _Solution(theta, objective, None, note)
        return _Solution(theta, objective, _bootstrap(prob, theta, n_boot, seed), None)


def fit_scaling_law(
    N: ArrayLike, loss: ArrayLike, D: ArrayLike | None = None, *, n_boot: int = 200, seed: int = 0
) -> ScalingFit:
    """Fit L(N), or L(N,D) when D is given and varies, to final losses.

    A D that takes a single value is ignored: its term is then a constant that
    E absorbs. n_boot=0 skips the bootstrap and leaves `ci` empty.
    """
    if n_boot < 0:
        raise FitError(f"n_boot must be >= 0, got {n_boot}")
    N_arr, loss_arr, D_arr = _inputs(N, loss, D)
    if D_arr is not None and len(np.unique(D_arr)) == 1:
        D_arr = None
    prob = _Problem.from_data(N_arr, loss_arr, D_arr)
    sol = _solve(prob, n_boot, seed)
    params = dict(zip(prob.names, (float(v) for v in _natural_params(sol.theta, prob))))
    form = "L(N)" if D_arr is None else "L(N,D)"
    return ScalingFit(form, params, sol.ci(prob.names), len(N_arr), sol.objective,
                      **sol.interval_fields)


def holdout_check(N: ArrayLike, loss: ArrayLike, D: ArrayLike | None = None, **kw) -> dict:
    """Fit without the largest N and score the prediction of its loss.

    When several points share the largest N (several token budgets), predicted,
    actual and the errors are means over those points. `kw` goes to
    fit_scaling_law; n_boot defaults to 0 since a point prediction needs no
    intervals.
    """
    kw.setdefault("n_boot", 0)
    N_arr, loss_arr, D_arr = _inputs(N, loss, D)
    held = N_arr == N_arr.max()
    try:
        fit = fit_scaling_law(
            N_arr[~held], loss_arr[~held], None if D_arr is None else D_arr[~held], **kw
        )
    except FitError as e:
        raise FitError(f"held-out check (largest N removed): {e}") from e
    predicted = fit.predict(N_arr[held], None if D_arr is None else D_arr[held])
    actual = loss_arr[held]
    abs_err = np.abs(predicted - actual)
    return {
        "held_out_N": float(N_arr.max()),
        "n_held_out": int(held.sum()),
        "predicted": float(predicted.mean()),
        "actual": float(actual.mean()),
        "abs_error": float(abs_err.mean()),
        "rel_error": float((abs_err / actual).mean()),
    }


_Rows = list[tuple[int, list[str]]]  # (1-based line number, fields)


def _read_rows(path: Path) -> tuple[list[str], _Rows]:
    """Header (stripped) and non-blank data rows with their 1-based line numbers."""
    try:
        with path.open(newline="") as f:
            rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if row]
    except OSError as e:
        raise FitError(f"{path}: cannot read the file ({e.strerror})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise FitError(f"{path}: not a readable CSV file ({e})") from e
    if not rows:
        raise FitError(f"{path}: empty file; expected a header row with columns N, loss (and D)")
    return [h.strip() for h in rows[0][1]], rows[1:]


def _column(path: Path, header: list[str], rows: _Rows, name: str) -> np.ndarray:
    col = header.index(name)
    values = []
    for line, row in rows:
        text = row[col].strip() if col < len(row) else ""
        try:
            value = float(text)
        except ValueError:
            raise FitError(
                f"{path} line {line}: column '{name}' has non-numeric value {text!r}; "
                f"every {name} must be a positive number"
            ) from None
        if not (np.isfinite(value) and value > 0):
            raise FitError(
                f"{path} line {line}: column '{name}' has non-positive or non-finite value "
                f"{text!r}; every {name} must be a positive number"
            )
        values.append(value)
    return np.array(values)


_Table = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # N, loss, D


def _read_groups(path: Path, by: Sequence[str]) -> dict[tuple[str, ...], tuple[str, _Table]]:
    """(label, table) per group of rows sharing the values of the `by` columns
    present in the file; keys are those values, () when none is present."""
    header, rows = _read_rows(path)
    for name in ("N", "loss"):
        if name not in header:
            raise FitError(
                f"{path}: missing column '{name}' (found {', '.join(header)}); the CSV needs a "
                "header row with columns N, loss, and D when token budgets vary"
            )
    if not rows:
        raise FitError(f"{path}: no data rows under the header; add one row per run")
    group_names = [c for c in by if c in header]
    group_cols = [header.index(c) for c in group_names]
    grouped: dict[tuple[str, ...], _Rows] = {}
    for line, row in rows:
        key = tuple(row[c].strip() if c < len(row) else "" for c in group_cols)
        grouped.setdefault(key, []).append((line, row))

    out = {}
    for key, group_rows in grouped.items():
        N, loss = _column(path, header, group_rows, "N"), _column(path, header, group_rows, "loss")
        D = _column(path, header, group_rows, "D") if "D" in header else None
        label = ", ".join(f"{c}={v}" for c, v in zip(group_names, key))
        out[key] = (f"{path} ({label})" if label else str(path), (N, loss, D))
    return out


def _fit_table(label: str, table: _Table, **kw) -> ScalingFit:
    N, loss, D = table
    try:
        return fit_scaling_law(N, loss, D, **kw)
    except FitError as e:
        raise FitError(f"{label}: {e}") from e


def fit_csv_groups(
    path: str | Path, by: Sequence[str] = _GROUP_COLUMNS, **kw
) -> dict[tuple[str, ...], ScalingFit]:
    """One fit per group of rows sharing the values of the `by` columns present
    in the file (by default scheme and plan); keys are those values in `by`
    order, () when none of the columns is present. `kw` goes to fit_scaling_law."""
    groups = _read_groups(Path(path), by)
    return {key: _fit_table(label, table, **kw) for key, (label, table) in groups.items()}


def fit_csv(path: str | Path, **kw) -> ScalingFit:
    """Fit the table in a CSV with columns N, loss and optionally D (L(N,D) then).

    Extra columns are ignored, except that a file holding several
    (scheme, plan) groups is refused rather than fitted as one law.
    `kw` goes to fit_scaling_law.
    """
    groups = _read_groups(Path(path), _GROUP_COLUMNS)
    if len(groups) > 1:
        raise FitError(
            f"{path}: holds {len(groups)} (scheme, plan) groups; fit each separately "
            "(fit_csv_groups) or filter the file to one group"
        )
    label, table = next(iter(groups.values()))
    return _fit_table(label, table, **kw)


def compare_to_baseline(values_by_group: dict[str, list[float]], baseline: str) -> dict:
    """Per group: mean, std (sample, ddof=1), n, the difference of means from the
    baseline and a Welch t-test p-value against it. std and p_value are None when
    a side has fewer than 2 values; the baseline's own p_value is None."""
    if baseline not in values_by_group:
        raise ValueError(f"baseline group {baseline!r} not among groups {sorted(values_by_group)}")
    base = np.asarray(values_by_group[baseline], dtype=float)
    base_mean = float(base.mean()) if len(base) else None
    out = {}
    for group, values in values_by_group.items():
        v = np.asarray(values, dtype=float)
        mean = float(v.mean()) if len(v) else None
        p_value = None
        if group != baseline and len(v) >= 2 and len(base) >= 2:
            p = float(stats.ttest_ind(v, base, equal_var=False).pvalue)
            p_value = None if np.isnan(p) else p  # nan: both groups have zero variance
        out[group] = {
            "mean": mean,
            "std": float(v.std(ddof=1)) if len(v) >= 2 else None,
            "n": len(v),
            "diff": None if mean is None or base_mean is None else mean - base_mean,
            "p_value": p_value,
        }
    return out


# --- precision-aware joint law -------------------------------------------------------------

_NOISE_DRAWS = 64  # observation-noise draws per bootstrap draw, for prediction intervals
_LOSS_COLUMNS = ("loss", "val_bpb")  # the first present is fitted


@dataclass
class BytesRelation:
    """Deployable bytes of one plan as a power law of N, fitted by least squares on logs:
    log bytes = intercept + slope * log N.

    Why a power law and not bytes = a * N + b: packed bytes are blocks (~ N at the plan's bits)
    plus the embedding and head (~ vocab * width, which grows like sqrt(N) at fixed depth), so
    neither form is exact; the power law is positive and monotone everywhere, inverts in closed
    form, and its error on the measured points is reported (`max_rel_error`) so a poor fit shows.
    """

    slope: float
    intercept: float
    max_rel_error: float  # largest |fitted / measured - 1| over the plan's points
    bytes_range: tuple[float, float]  # measured bytes, to flag extrapolation

    @classmethod
    def fit(cls, N: np.ndarray, nbytes: np.ndarray) -> BytesRelation:
        slope, intercept = np.polyfit(np.log(N), np.log(nbytes), 1)
        fitted = np.exp(intercept + slope * np.log(N))
        return cls(float(slope), float(intercept), float(np.max(np.abs(fitted / nbytes - 1))),
                   (float(nbytes.min()), float(nbytes.max())))

    def n_at(self, budget: float) -> float:
        """Parameters N this plan fits in `budget` bytes."""
        return float(np.exp((np.log(budget) - self.intercept) / self.slope))

    def to_json(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept,
                "max_rel_error": self.max_rel_error, "bytes_range": list(self.bytes_range)}


@dataclass
class PrecisionLaw:
    """L(N, [D,] plan) = E + A (N f_plan)^-alpha [+ B D^-beta], f_reference = 1."""

    form: str  # "L(N,plan)" or "L(N,D,plan)"
    reference: str
    plans: tuple[str, ...]  # the reference first
    params: dict[str, float]  # E, A, alpha[, B, beta], f[plan] for every other plan
    ci: dict[str, tuple[float, float]]  # 95% bootstrap intervals; empty when n_boot=0
    n_points: int
    objective: float
    residual_sd: float  # sd of the log-loss residuals with `dof` degrees of freedom
    dof: int  # points - parameters
    samples: np.ndarray | None  # bootstrap draws of the parameters, columns in `params` order
    bytes: dict[str, BytesRelation]  # per plan with >= 2 distinct N and packed bytes
    ci_note: str | None = None
    ci_method: str | None = None  # "seeds" or "parametric" (module docstring), with `ci`
    boot_failed: float | None = None  # share of bootstrap refits that converged from no start

    def _loss(self, draws: np.ndarray, N: float, plan: str, D: float | None) -> np.ndarray:
        """Predicted loss for each row of parameter draws (m, p) -> (m,)."""
        if plan not in self.plans:
            raise FitError(f"plan {plan!r} was not fitted; plans: {', '.join(self.plans)}")
        names = list(self.params)
        f = 1.0 if plan == self.reference else draws[:, names.index(f"f[{plan}]")]
        loss = draws[:, 0] + draws[:, 1] * (N * f) ** -draws[:, 2]
        if self.form == "L(N,D,plan)":
            if D is None:
                raise FitError("this law has a token-budget term: give D (training tokens)")
            loss = loss + draws[:, 3] * D ** -draws[:, 4]
        return loss

    def predict(self, N: float, plan: str, D: float | None = None) -> float:
        """Predicted loss of `plan` at N parameters (and D tokens for the L(N,D,plan) form)."""
        return float(self._loss(np.array([list(self.params.values())]), N, plan, D)[0])

    def at_budget(self, budget: float, D: float | None = None, seed: int = 0) -> dict:
        """Each plan at `budget` deployable bytes: N from its bytes relation, predicted loss with
        a 95% confidence interval of the mean (bootstrap draws of the parameters) and a 95%
        prediction interval of one more trained model (those draws times multiplicative noise
        exp(residual_sd * t_dof)); p_beats[X][Y], the probability that one more trained model
        of X has a lower loss than one more of Y (the same draws, each plan's own noise); and
        mean_lower_share[X][Y], the share of bootstrap draws in which X's predicted mean loss is
        below Y's (how sure the fit is of the order of the means, not of one run's)."""
        if not budget > 0:
            raise FitError(f"a byte budget must be positive, got {budget}")
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {"budget_bytes": float(budget), "plans": {}}
        draws: dict[str, np.ndarray] = {}
        runs: dict[str, np.ndarray] = {}  # one more trained model per (draw, noise draw)
        for plan in self.plans:
            rel = self.bytes.get(plan)
            if rel is None:
                out["plans"][plan] = {"skipped": "no bytes relation: needs packed_bytes growing "
                                                 "with N over 2 or more distinct N"}
                continue
            N = rel.n_at(budget)
            lo, hi = rel.bytes_range
            entry = {"N": N, "extrapolated": not lo <= budget <= hi,
                     "loss": self.predict(N, plan, D)}
            if self.samples is not None:
                draws[plan] = mean = self._loss(self.samples, N, plan, D)
                noise = np.exp(self.residual_sd * rng.standard_t(self.dof, (len(mean),
                                                                            _NOISE_DRAWS)))
                entry["ci"] = [float(v) for v in np.percentile(mean, [2.5, 97.5])]
                runs[plan] = mean[:, None] * noise
                entry["pi"] = [float(v) for v in np.percentile(runs[plan], [2.5, 97.5])]
            out["plans"][plan] = entry
        if draws:
            out["p_beats"] = {x: {y: float(np.mean(runs[x] < runs[y])) for y in runs if y != x}
                              for x in runs}
            out["mean_lower_share"] = {x: {y: float(np.mean(draws[x] < draws[y]))
                                           for y in draws if y != x} for x in draws}
        fitted = {p: e["loss"] for p, e in out["plans"].items() if "loss" in e}
        out["best"] = min(fitted, key=fitted.get) if fitted else None
        return out

    def to_json(self) -> dict:
        return {
            "form": self.form, "reference": self.reference, "plans": list(self.plans),
            **{k: float(v) for k, v in self.params.items()},
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
            "n_points": self.n_points, "objective": self.objective,
            "residual_sd": self.residual_sd, "dof": self.dof,
            "bytes": {p: r.to_json() for p, r in self.bytes.items()},
            **_interval_json(self.ci_note, self.ci_method, self.boot_failed),
        }


def fit_precision_law(
    N: ArrayLike, loss: ArrayLike, plan: Sequence[str], D: ArrayLike | None = None, *,
    packed_bytes: ArrayLike | None = None, reference: str = "fp", n_boot: int = 200,
    seed: int = 0,
) -> PrecisionLaw:
    """Fit the joint law across plans to final losses (a D that takes one value is ignored).

    `reference` (f = 1) should be the most precise plan, since every f is bounded to (0, 1].
    With `packed_bytes`, each plan also gets a BytesRelation for predictions at a byte budget.
    """
    if n_boot < 0:
        raise FitError(f"n_boot must be >= 0, got {n_boot}")
    N_arr, loss_arr, D_arr = _inputs(N, loss, D)
    labels = [str(p) for p in plan]
    if len(labels) != len(N_arr):
        raise FitError(f"plan must have one label per point, got {len(labels)} for "
                       f"{len(N_arr)} points")
    if reference not in labels:
        raise FitError(f"reference plan {reference!r} has no points (plans: "
                       f"{', '.join(sorted(set(labels)))}); pass the most precise plan as "
                       "the reference")
    if D_arr is not None and len(np.unique(D_arr)) == 1:
        D_arr = None
    plans = (reference, *sorted(set(labels) - {reference}))
    index = np.array([plans.index(p) for p in labels])
    prob = _Problem.from_data(N_arr, loss_arr, D_arr, index, plans)
    sol = _solve(prob, n_boot, seed)
    natural = _natural_params(sol.theta, prob)
    residuals = _residuals(sol.theta, prob)
    dof = len(N_arr) - len(natural)
    relations = {}
    if packed_bytes is not None:
        nbytes = _as_array(packed_bytes, "packed_bytes")
        for i, p in enumerate(plans):
            mine = index == i
            if len(np.unique(N_arr[mine])) < 2:
                continue
            rel = BytesRelation.fit(N_arr[mine], nbytes[mine])
            if rel.slope > 0:  # bytes that do not grow with N cannot be inverted
                relations[p] = rel
    return PrecisionLaw(
        form="L(N,plan)" if D_arr is None else "L(N,D,plan)", reference=reference, plans=plans,
        params=dict(zip(prob.names, (float(v) for v in natural))), ci=sol.ci(prob.names),
        n_points=len(N_arr), objective=sol.objective,
        residual_sd=float(np.sqrt(np.sum(residuals**2) / dof)), dof=dof,
        samples=sol.samples, bytes=relations, **sol.interval_fields,
    )


def fit_precision_csv(path: str | Path, **kw) -> PrecisionLaw:
    """The joint law on a results CSV: columns plan, N, loss (else val_bpb), and optionally D,
    packed_bytes, scheme (plans are then named scheme/plan where layers are ternary) and status
    (only FINISHED rows are used). `kw` goes to fit_precision_law."""
    path = Path(path)
    header, rows = _read_rows(path)
    metric = next((c for c in _LOSS_COLUMNS if c in header), None)
    for name, present in (("plan", "plan" in header), ("N", "N" in header),
                          ("loss or val_bpb", metric is not None)):
        if not present:
            raise FitError(f"{path}: missing column '{name}' (found {', '.join(header)}); the "
                           "joint fit needs plan, N, loss or val_bpb, and packed_bytes for "
                           "byte budgets")

    def cell(row: list[str], name: str) -> str:
        col = header.index(name)
        return row[col].strip() if col < len(row) else ""

    if "status" in header:
        rows = [(line, row) for line, row in rows if cell(row, "status") == "FINISHED"]
    if not rows:
        raise FitError(f"{path}: no finished data rows; add one row per run")
    scheme = "scheme" in header
    plans = [plan_label(cell(r, "scheme") if scheme else None, cell(r, "plan")) for _, r in rows]
    N, loss = _column(path, header, rows, "N"), _column(path, header, rows, metric)
    D = _column(path, header, rows, "D") if "D" in header else None
    nbytes = _column(path, header, rows, "packed_bytes") if "packed_bytes" in header else None
    try:
        return fit_precision_law(N, loss, plans, D, packed_bytes=nbytes, **kw)
    except FitError as e:
        raise FitError(f"{path}: {e}") from e
