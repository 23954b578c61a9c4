"""What Ray Train ships to a trial's controller and workers: the worker's entry point and the
runtime it needs beyond the config.

Kept light on purpose (no MLflow, DeepSpeed or training code at import): Ray Train's controller
unpickles the entry point only to hand it on to the workers, and importing the training stack
there cost every trial's start about two seconds. The workers import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrialRuntime:
    """What a worker needs beyond the config: where to log, and which run."""

    tracking_uri: str
    run_id: str
    launched_at: float | None = None
    """Unix time the driver called fit(): the worker measures Ray Train's launch from it."""


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (`train_loop_per_worker`): `payload` holds the
    trial's config and runtime, validated once by the driver (see `ternarylm.train`)."""
    from ternarylm.train import run_worker

    run_worker(payload)
