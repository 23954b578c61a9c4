"""A learning-rate search per study cell: fair comparisons of precisions, not of one shared rate.

For every cell (size x scheme x plan) short search trials train at each candidate peak rate on
a fraction of the cell's token budget (Ray Tune, ASHA per cell by default); the rate whose
completed search trial reaches the lowest validation loss trains the cell's full trials (its
seeds as configured). Search trials are ordinary trials (content keys, so a rerun reuses them),
tagged as search trials on their MLflow runs and kept out of fits and the frontier.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ternarylm.config import ConfigError, TrialConfig

SEARCH_TAG = "ternarylm.lr_search.cell"
"""MLflow tag of a search trial's run: the cell it searches for."""
SCHEDULERS = ("asha", "fifo")


@dataclass
class LRSearchConfig:
    values: list[float] | None = None
    """Candidate peak learning rates; or give low, high and num for a log-spaced grid."""
    low: float | None = None
    """Lowest candidate of a log-spaced grid."""
    high: float | None = None
    """Highest candidate of a log-spaced grid."""
    num: int = 4
    """Candidates in a log-spaced grid (low and high included)."""
    budget_fraction: float = 0.25
    """Share of the cell's training tokens each search trial trains on."""
    scheduler: str = "asha"
    """`asha` stops poor rates early (per cell, on validation loss); `fifo` runs all to the end."""
    evals: int = 2
    """Evaluations per search trial (ASHA decides at each)."""
    candidates: list[float] = field(init=False)
    """The resolved candidate rates, ascending."""

    def __post_init__(self) -> None:
        grid = self.low is not None or self.high is not None
        if (self.values is None) == (not grid):
            raise ConfigError("study.lr_search: give either values: [...] or low, high and num")
        if self.values is not None:
            candidates = [float(v) for v in self.values]
        else:
            if self.low is None or self.high is None or not 0 < self.low < self.high:
                raise ConfigError(f"study.lr_search: need 0 < low < high, got low={self.low} "
                                  f"high={self.high}")
            if self.num < 2:
                raise ConfigError(f"study.lr_search.num must be >= 2, got {self.num}")
            ratio = (self.high / self.low) ** (1 / (self.num - 1))
            candidates = [self.low * ratio ** i for i in range(self.num)]
        if len(candidates) < 2 or any(not v > 0 for v in candidates):
            raise ConfigError(f"study.lr_search: need at least 2 positive rates, got "
                              f"{candidates}")
        self.candidates = sorted(set(candidates))
        if not 0 < self.budget_fraction <= 1:
            raise ConfigError(f"study.lr_search.budget_fraction must be in (0, 1], got "
                              f"{self.budget_fraction}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"study.lr_search.scheduler must be asha or fifo, got "
                              f"{self.scheduler!r}")
        if self.evals < 1:
            raise ConfigError(f"study.lr_search.evals must be >= 1, got {self.evals}")


def search_trials(trial: TrialConfig, search: LRSearchConfig) -> list[TrialConfig]:
    """One short trial per candidate rate, for the cell of `trial` (its first seed)."""
    t = trial.train
    steps = max(2, math.ceil(search.budget_fraction * t.steps))
    every = max(1, steps // search.evals)
    out = []
    for lr in search.candidates:
        train = dataclasses.replace(
            t, lr=lr, steps=steps, warmup_steps=min(steps - 1, round(t.warmup_steps * steps
                                                                      / t.steps)),
            eval_every=every, checkpoint_every=every, log_every=min(t.log_every, every))
        out.append(dataclasses.replace(trial, train=train, name=None))
    return out


def with_lr(trial: TrialConfig, lr: float) -> TrialConfig:
    return dataclasses.replace(trial, train=dataclasses.replace(trial.train, lr=lr))


@dataclass
class Choice:
    cell: str
    lr: float
    """The chosen peak rate: lowest validation loss among completed search trials."""
    losses: dict[float, float]
    """Final validation loss of each completed search trial, by rate."""
    candidates: list[float]
    at_edge: bool
    """The winner is the lowest or highest candidate: the best rate may lie outside them."""

    def warning(self) -> str | None:
        if not self.at_edge:
            return None
        side = "lowest" if self.lr == self.candidates[0] else "highest"
        return (f"lr search for {self.cell}: the best rate {self.lr:g} is the {side} "
                f"candidate; widen the range (the optimum may lie outside it)")


def choose(cell: str, losses: dict[float, float | None], candidates: list[float]) -> Choice:
    """The winner among completed search trials (a None loss: stopped early or failed)."""
    done = {lr: loss for lr, loss in losses.items()
            if loss is not None and math.isfinite(loss)}
    if not done:
        raise ConfigError(f"lr search for {cell}: no search trial completed; see the search "
                          f"runs in MLflow")
    lr = min(done, key=done.get)
    return Choice(cell, lr, done, sorted(candidates),
                  at_edge=lr in (min(candidates), max(candidates)))
