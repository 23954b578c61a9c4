"""What Ray Train ships to a trial's controller and workers: the worker's entry point and the
runtime it needs beyond the config.

Kept light on purpose (no MLflow, DeepSpeed or training code at import): Ray Train's controller
unpickles the entry point only to hand it on to the workers, and importing the training stack
there cost every trial's start about two seconds. The workers import it when they run. For the
same reason the trial travels pickled, as bytes (`payload`): the controller unpickles its
`train_loop_config` too, and a TrialConfig object would import torch and the model there.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any


@dataclass
class TrialRuntime:
    """What a worker needs beyond the config: where to log, and which run."""

    tracking_uri: str
    run_id: str
    launched_at: float | None = None
    """Unix time the driver called fit(): the worker measures Ray Train's launch from it."""


def payload(trial: Any, runtime: TrialRuntime) -> dict[str, bytes]:
    """The `train_loop_config` of a trial's workers: its config (validated once by the
    driver) and runtime, pickled, so only the workers unpickle them."""
    return {"payload": pickle.dumps({"trial": trial, "runtime": runtime})}


def cohort_payload(trials: list[Any], runtimes: list[TrialRuntime]) -> dict[str, bytes]:
    """The `train_loop_config` of a cohort's workers: its members' configs and runtimes, in
    the same order."""
    return {"payload": pickle.dumps({"trials": trials, "runtimes": runtimes})}


def train_worker(config: dict[str, bytes]) -> None:
    """Entry point of every Ray Train worker of a trial (`train_loop_per_worker`)."""
    from ternarylm.training.train import run_worker

    run_worker(pickle.loads(config["payload"]))


def cohort_worker(config: dict[str, bytes]) -> None:
    """Entry point of every Ray Train worker of a cohort."""
    from ternarylm.training.cohort_train import run_cohort_worker

    run_cohort_worker(pickle.loads(config["payload"]))
