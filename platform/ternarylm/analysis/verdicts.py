"""Verdicts from seeds: tests with three outcomes, the seeds a test needs, intervals over seeds.

A verdict is *supports* when its supporting test passes (p < ALPHA), *contradicts* when the
opposite one-sided test passes, *cannot tell* when neither does. Seeds are the unit: one value
per trained model. A group with no spread over its seeds is known exactly, so its tests are
decided by the sign of the difference. `Power` says what would decide a cannot-tell: the seeds
a standard power calculation asks for (ALPHA, POWER) from the measured seed-to-seed spread, or
from an assumed one where fewer than two seeds ran. Used by the paper-claims study
(studies/claims.py); nothing here knows a claim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

SUPPORTS, CONTRADICTS, CANNOT_TELL = "supports", "contradicts", "cannot tell"
VERDICTS = (SUPPORTS, CONTRADICTS, CANNOT_TELL)

CONFIDENCE = 0.95  # every interval
ALPHA = 0.05  # level of every one-sided test (a TOST is two of them at this level)
POWER = 0.8  # the power the seeds a cannot-tell needs are sized for
MAX_SEEDS = 200  # beyond this the power calculation says "more than"
MIN_SEEDS = 2  # a test over seeds needs at least two
N_BOOT = 2000  # bootstrap resamples


def pct(x: float) -> str:
    return f"{100 * x:g}%"


def one_sided_p(values: Sequence[float], bound: float, greater: bool) -> float | None:
    """p of the one-sample t test of H1: mean > bound (greater) or mean < bound, over seeds."""
    v = np.asarray(values, dtype=float) * (1 if greater else -1)
    bound = bound if greater else -bound
    if len(v) < MIN_SEEDS:
        return None
    if np.ptp(v) == 0:  # no spread: the mean is known exactly
        return 0.0 if v[0] > bound else 1.0
    return float(stats.ttest_1samp(v, bound, alternative="greater").pvalue)


def welch_p(a: Sequence[float], b: Sequence[float], shift: float, greater: bool) -> float | None:
    """p of Welch's t test of H1: mean(a) - mean(b) > shift (greater) or < shift."""
    x, y = np.asarray(a, dtype=float) - shift, np.asarray(b, dtype=float)
    if len(x) < MIN_SEEDS or len(y) < MIN_SEEDS:
        return None
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        d = x[0] - y[0]
        return 0.0 if (d > 0 if greater else d < 0) else 1.0
    return float(stats.ttest_ind(x, y, equal_var=False,
                                 alternative="greater" if greater else "less").pvalue)


def _max_p(*ps: float | None) -> float | None:
    """p of an intersection-union test (all of them must pass): the largest p."""
    return None if any(p is None for p in ps) else max(ps)


def _min_p(*ps: float | None) -> float | None:
    """p of 'one of them passes', each at ALPHA: the smallest known p."""
    known = [p for p in ps if p is not None]
    return min(known) if known else None


@dataclass(frozen=True)
class Test:
    """One stated test: p of its supporting test and of its contradicting (opposite) test."""

    supports_if: str
    contradicts_if: str
    p_supports: float | None
    p_contradicts: float | None

    @property
    def outcome(self) -> str:
        if self.p_supports is not None and self.p_supports < ALPHA:
            return SUPPORTS
        if self.p_contradicts is not None and self.p_contradicts < ALPHA:
            return CONTRADICTS
        return CANNOT_TELL

    def text(self) -> str:
        def p(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3g}"
        return (f"supports if {self.supports_if} (p={p(self.p_supports)}), contradicts if "
                f"{self.contradicts_if} (p={p(self.p_contradicts)}) -> {self.outcome}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"outcome": self.outcome}


def band_test(values: Sequence[float], lo: float, hi: float, what: str) -> Test:
    """Equivalence (TOST: mean > lo and mean < hi) against 'mean outside [lo, hi]'."""
    return Test(f"mean {what} in [{lo:.4g}, {hi:.4g}] (TOST)",
                f"mean {what} < {lo:.4g} or > {hi:.4g}",
                _max_p(one_sided_p(values, lo, True), one_sided_p(values, hi, False)),
                _min_p(one_sided_p(values, lo, False), one_sided_p(values, hi, True)))


def above_test(values: Sequence[float], bound: float, what: str) -> Test:
    """Superiority (mean > bound) against its opposite (mean < bound)."""
    return Test(f"mean {what} > {bound:.4g}", f"mean {what} < {bound:.4g}",
                one_sided_p(values, bound, True), one_sided_p(values, bound, False))


def combine(tests: Sequence[Test]) -> str:
    """Several tests that must all support: any contradiction contradicts."""
    outcomes = [t.outcome for t in tests]
    if CONTRADICTS in outcomes:
        return CONTRADICTS
    return SUPPORTS if outcomes and all(o == SUPPORTS for o in outcomes) else CANNOT_TELL


def _power(n: int, effects: Sequence[float], sd: float, two_sample: bool) -> float:
    """Power of a one-sided t test (one effect) or a TOST (two: the distances to both bounds)
    at n seeds per group; the TOST's is the usual lower bound 1 - P(miss lo) - P(miss hi)."""
    df = 2 * n - 2 if two_sample else n - 1
    se = sd * math.sqrt((2 if two_sample else 1) / n)
    crit = stats.t.ppf(1 - ALPHA, df)
    misses = [stats.nct.cdf(crit, df, e / se) for e in effects]
    return 1 - sum(misses)


def seeds_needed(effects: Sequence[float], sd: float, two_sample: bool = False) -> int | None:
    """Seeds (per group) at which a test of these true effects reaches POWER at ALPHA; None
    when no number up to MAX_SEEDS does (an effect at or past its bound: no seeds decide)."""
    if sd <= 0 or min(effects) <= 0:
        return None
    for n in range(MIN_SEEDS, MAX_SEEDS + 1):
        if _power(n, effects, sd, two_sample) >= POWER:
            return n
    return None


@dataclass(frozen=True)
class Power:
    """What would decide a cannot-tell: seeds per group toward the outcome the data lean to."""

    toward: str
    seeds: int | None
    have: int
    sd: float
    sd_source: str
    """'measured over n seeds', or where an assumed sd comes from."""

    def text(self) -> str:
        need = (f"more than {MAX_SEEDS} seeds" if self.seeds is None
                else f"{self.seeds} seeds (have {self.have})")
        verb = {SUPPORTS: "support", CONTRADICTS: "contradict"}[self.toward]
        return (f"{need} to {verb} at power {POWER:g}, alpha {ALPHA:g}, seed sd "
                f"{self.sd:.3g} ({self.sd_source})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pooled_sd(groups: Sequence[Sequence[float]], assumed: tuple[float, str]) -> tuple[float, str]:
    """The pooled seed-to-seed sd of the groups and where it comes from; `assumed` (an sd and
    its source) where a group has fewer than two seeds or none has any spread."""
    usable = [np.asarray(g, dtype=float) for g in groups if len(g) >= MIN_SEEDS]
    if usable and all(len(g) >= MIN_SEEDS for g in groups):
        dof = sum(len(g) - 1 for g in usable)
        pooled = math.sqrt(sum((len(g) - 1) * g.var(ddof=1) for g in usable) / dof)
        if pooled > 0:
            return pooled, f"measured over {min(len(g) for g in usable)} seeds"
    return assumed


def band_power(values: Sequence[float], lo: float, hi: float, assumed: tuple[float, str],
               assumed_mean: float | None = None) -> Power:
    """Seeds that decide a band test: toward supports (TOST) when the mean lies inside the band,
    toward contradicts (the one-sided test past the nearer bound) when outside. `assumed`: the
    sd (and its source) used below two seeds."""
    sd, source = pooled_sd([values], assumed)
    mean = assumed_mean if assumed_mean is not None else float(np.mean(values))
    if lo < mean < hi:
        return Power(SUPPORTS, seeds_needed([mean - lo, hi - mean], sd), len(values), sd, source)
    return Power(CONTRADICTS, seeds_needed([max(lo - mean, mean - hi)], sd), len(values), sd,
                 source)


def shift_power(effect: float, n: int, sd: float, source: str, two_sample: bool) -> Power:
    """Seeds that decide a one-sided test whose observed effect over its bound is `effect`."""
    toward = SUPPORTS if effect > 0 else CONTRADICTS
    return Power(toward, seeds_needed([abs(effect)], sd, two_sample), n, sd, source)


@dataclass(frozen=True)
class Interval:
    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    n: int

    def text(self, fmt: str = ".4g") -> str:
        if self.std is None:
            return f"{self.mean:{fmt}} (n={self.n})"
        return (f"{self.mean:{fmt}} +- {self.std:{fmt}} [{pct(CONFIDENCE)} CI "
                f"{self.lo:{fmt}}, {self.hi:{fmt}}] (n={self.n})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_interval(values: Sequence[float]) -> Interval:
    """Mean, sample std and the t-interval of the mean over seeds (none below two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < MIN_SEEDS:
        return Interval(float(v.mean()) if len(v) else math.nan, None, None, None, len(v))
    std = float(v.std(ddof=1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * std / math.sqrt(len(v))
    return Interval(float(v.mean()), std, float(v.mean() - half), float(v.mean() + half), len(v))


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a paired, vectorized statistic (scipy.stats)."""
    res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=N_BOOT,
                          confidence_level=CONFIDENCE, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standardised mean difference (a - b) with the small-sample correction."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < MIN_SEEDS or len(y) < MIN_SEEDS:
        return None
    dof = len(x) + len(y) - 2
    pooled = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / dof)
    if pooled == 0:
        return None
    return float((x.mean() - y.mean()) / pooled * (1 - 3 / (4 * dof - 1)))
