"""One trial: a Ray Train `TorchTrainer` run of `train.train_worker`, recorded as one MLflow run.

The driver (this module) validates, prepares the data once, creates or resumes the trial's
MLflow run, and after training writes summary metrics and plots. Ray Train's run is named by the
trial's content key, so launching the same trial again resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from ternarylm import plots, tracking
from ternarylm.config import TrialConfig, ternarylm_home
from ternarylm.data import prepare_data
from ternarylm.train import DIVERGED_TAG, PROGRESS_METRIC, TrialRuntime, train_worker

SUMMARY_METRICS = ("val/loss", "val/ppl", "val/bpb", "train_sample/ppl", "train_val_ratio",
                   "sparsity/ternary", "memory/packed_bytes", "memory/latent_fp32_bytes",
                   "memory/peak_rss_bytes", "memory/peak_cuda_bytes", "perf/tokens_per_s",
                   "perf/mfu", "progress/tokens", "progress/flops", "scale/learned_drift",
                   "time/worker_init_s", "time/train_loop_s")


DRIVER_RESOURCE = "trial_driver"  # a custom resource for trial drivers (Tune trials), no CPU


def connect_ray() -> None:
    """Join the cluster in $RAY_ADDRESS (or one started on this machine), else start one.

    A cluster started here offers `trial_driver` slots, as the cluster configs' heads do, so
    that trial drivers take no CPU from training workers: with 0.01 CPU each, two 1-CPU trials
    would not fit on 2 cores.
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING}  # errors on the console stay one line
    if canonicalize_bootstrap_address(None) is None:
        ray.init(resources={DRIVER_RESOURCE: 1000}, **quiet)
    else:
        ray.init(**quiet)


def check_capacity(trials: list[TrialConfig]) -> None:
    """Every trial must fit the connected cluster, unless it autoscales."""
    import ray

    if os.environ.get("TERNARYLM_AUTOSCALING") == "1":
        return
    resources = ray.cluster_resources()
    for t in trials:
        t.check_capacity(resources)


class TrialFailed(RuntimeError):
    """The trial ended without a final model (diverged, or its workers kept failing)."""


@dataclass
class TrialResult:
    run_id: str
    key: str
    status: str
    """MLflow run status: FINISHED or FAILED."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final summary metrics (`final/...` in MLflow, without the prefix here)."""
    skipped: bool = False
    """True when the trial had already finished and nothing was trained."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the phases of this launch (setup, train, finish)."""


def storage_path(cfg: TrialConfig) -> str:
    path = cfg.storage_path or os.environ.get("TERNARYLM_STORAGE_PATH")
    return path or str(ternarylm_home() / "runs")


def _existing_result(uri: str, run) -> TrialResult:
    final = {k[len("final/"):]: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    return TrialResult(run.info.run_id, run.data.tags[tracking.TRIAL_KEY_TAG], run.info.status,
                       final, skipped=True)


def open_run(cfg: TrialConfig, uri: str, parent_run_id: str | None) -> tuple[str, Any | None]:
    """The trial's run id: a finished run is returned as is, an unfinished one is resumed."""
    experiment_id = tracking.ensure_experiment(cfg.experiment, uri)
    run = tracking.find_run(uri, experiment_id, tracking.TRIAL_KEY_TAG, cfg.key())
    if run is not None and run.info.status == "FINISHED":
        return run.info.run_id, run
    if run is not None:
        tracking.resume_run(uri, run.info.run_id)
        return run.info.run_id, None
    tags = {tracking.TRIAL_KEY_TAG: cfg.key(), "ternarylm.size": cfg.size,
            "ternarylm.scheme": cfg.scheme, "ternarylm.plan": cfg.plan.name}
    run_id = tracking.start_run(uri, experiment_id, cfg.run_name, tags, parent_run_id)
    return run_id, None


def build_trainer(cfg: TrialConfig, runtime: TrialRuntime, callbacks: list | None = None):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    return TorchTrainer(
        train_worker,
        train_loop_config={"trial": cfg.to_dict(), "runtime": runtime.__dict__},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"trial-{cfg.key()}", storage_path=storage_path(cfg),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             callbacks=callbacks or []),
    )


def run_trial(cfg: TrialConfig, *, parent_run_id: str | None = None,
              callbacks: list | None = None, tracking_uri: str | None = None) -> TrialResult:
    """Train one model to the end (or resume it), returning its final metrics.

    Raises TrialFailed, with the MLflow run marked FAILED and the reason tagged, when the loss
    diverges or the workers exhaust their failure budget.
    """
    t0 = time.perf_counter()
    uri = tracking_uri or tracking.tracking_uri()
    # Every check before the MLflow run exists: bad input leaves no run half made.
    prepare_data(cfg.data)  # fails on bad data before any worker starts; workers hit the cache
    tracking.check_tracking(uri)
    connect_ray()
    check_capacity([cfg])
    run_id, finished = open_run(cfg, uri, parent_run_id)
    if finished is not None:
        return _existing_result(uri, finished)
    tracking.log_params(uri, run_id, cfg.flat())
    trainer = build_trainer(cfg, TrialRuntime(uri, run_id), callbacks)
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.end_run(uri, run_id, "FAILED", f"training failed: {e}")
        raise TrialFailed(f"trial {cfg.run_name} failed: {e}") from e
    t2 = time.perf_counter()
    metrics = result.metrics or {}
    diverged = tracking.client(uri).get_run(run_id).data.tags.get(DIVERGED_TAG)
    if diverged:
        tracking.end_run(uri, run_id, "FAILED", f"diverged: {diverged}")
        raise TrialFailed(f"trial {cfg.run_name} diverged: {diverged}")
    final = finish_run(uri, run_id, cfg, metrics)
    seconds = {"setup": t1 - t0, "fit": t2 - t1, "finish": time.perf_counter() - t2}
    if "time/train_loop_s" in metrics:  # absent when resumed at the last step
        seconds["outside_training"] = (seconds["setup"] + seconds["fit"] + seconds["finish"]
                                       - metrics["time/train_loop_s"])
    tracking.client(uri).log_batch(run_id, metrics=[
        Metric(f"time/{k}_s", v, int(time.time() * 1000), 0) for k, v in seconds.items()])
    return TrialResult(run_id, cfg.key(), "FINISHED", final, seconds=seconds)


def finish_run(uri: str, run_id: str, cfg: TrialConfig, metrics: dict[str, Any]) -> dict[str, float]:
    """Summary metrics and plots on the run, then mark it FINISHED."""
    final = {k: float(metrics[k]) for k in SUMMARY_METRICS
             if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
    c = tracking.client(uri)
    for k, v in final.items():
        c.log_metric(run_id, f"final/{k}", v)
    with tempfile.TemporaryDirectory() as d:
        series = {name: tracking.metric_history(uri, run_id, name)
                  for name in (PROGRESS_METRIC, "val/loss", "train_sample/loss")}
        plots.loss_curves(series, Path(d, "loss_curves.png"), cfg.run_name)
        sparsity = {int(k.rsplit("_", 1)[1]): float(v) for k, v in metrics.items()
                    if k.startswith("sparsity/block_")}
        if sparsity:
            plots.block_sparsity_bars(sparsity, Path(d, "block_sparsity.png"), cfg.run_name)
        tracking.log_artifact(uri, run_id, d, "plots")
    tracking.end_run(uri, run_id, "FINISHED")
    return final
