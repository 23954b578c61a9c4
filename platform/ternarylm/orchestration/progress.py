"""A study's progress line: trials done, running and left, and an estimate of the time left.

The estimate models a trial's wall time as `a + b x cost` (cost: its training FLOPs), fitted by
least squares on the trials finished so far: a fixed part (start-up, evaluation, teardown) that
dominates small trials, and a part that grows with the work. With fewer than two distinct costs
finished it falls back to their mean duration; with none finished it says nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StudyClock:
    """Starts and ends of one Tuner's trials; `line()` describes where the run stands."""

    concurrency: int
    """Trials running at once (study.max_concurrent): time left is shared among them."""
    costs: dict[str, float]
    """Every trial's cost (training FLOPs) by trial name."""
    started: dict[str, float] = field(default_factory=dict)
    """Start time of each running trial."""
    finished: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each trial that ended (skipped trials count with their short time)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def start(self, name: str, now: float | None = None) -> None:
        self.started.setdefault(name, time.monotonic() if now is None else now)

    def end(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        began = self.started.pop(name, now)
        self.finished[name] = now - began

    def predict(self, cost: float) -> float | None:
        """Expected wall seconds of a trial of this cost, from the finished ones."""
        points = [(self.costs[n], s) for n, s in self.finished.items()]
        if not points:
            return None
        xs = [c for c, _ in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(s for _, s in points) / len(points)
        var = sum((x - mean_x) ** 2 for x in xs)
        if var == 0:
            return mean_y
        slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / var)
        return max(0.0, mean_y + slope * (cost - mean_x))

    def seconds_left(self, now: float | None = None) -> float | None:
        """Work left (pending trials in full, running ones minus their elapsed time) spread over
        the concurrent slots; None until a trial has finished."""
        now = time.monotonic() if now is None else now
        if not self.finished:
            return None
        pending = [c for n, c in self.costs.items()
                   if n not in self.started and n not in self.finished]
        work = sum(self.predict(c) for c in pending)
        work += sum(max(0.0, self.predict(self.costs[n]) - (now - t0))
                    for n, t0 in self.started.items())
        return work / self.concurrency

    def line(self, now: float | None = None) -> str:
        """`3/15 done, 2 running, 10 left, ~4m10s to go` (no estimate before the first end)."""
        running = len(self.started)
        left = len(self.costs) - len(self.finished) - running
        text = f"{len(self.finished)}/{len(self.costs)} done, {running} running, {left} left"
        seconds = self.seconds_left(now)
        if seconds is not None and (running or left):
            text += f", ~{_duration(seconds)} to go"
        return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
