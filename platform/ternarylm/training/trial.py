"""One trial: a Ray Train `TorchTrainer` run of `worker.train_worker`, recorded as one MLflow run.

The driver (this module) validates, prepares the data once, creates or resumes the trial's
MLflow run, and after training draws the plots and closes the run. Metrics flow one way: the
workers write them (rank 0, summary included) to MLflow, and everything after reads them there.
Ray Train's run is named by the trial's content key, so launching the same trial again resumes
from its last checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ternarylm.core import metrics as M
from ternarylm.training import logged_model, run_inputs
from ternarylm.analysis import plots
from ternarylm import tracking
from ternarylm.training.cluster import (check_capacity, check_storage, cluster_watch, connect_ray,
                               ray_address, storage_path)
from ternarylm.config import TrialConfig
from ternarylm.data import prepare_data
from ternarylm.core.errors import Fault
from ternarylm.core.identity import NUMERICS_VERSIONS
from ternarylm.training.train import DIVERGED_TAG, QUARANTINED_TAG
from ternarylm.training.worker import TrialRuntime, payload, train_worker


INTERRUPTED = "interrupted (Ctrl-C) before it finished; run the same command again to resume"
"""Why a trial's run ended KILLED when its driver (or its study's) was interrupted."""


class TrialFailed(Fault):
    """The trial ended without a final model (diverged, or its workers kept failing)."""


def last_line(error: BaseException) -> str:
    """The last line of an error's message: Ray's errors put the task's details and the
    worker's traceback first, and the worker's own exception last."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


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
    failure: str | None = None
    """Why a FAILED trial failed, in one line with what to do."""


def existing_result(uri: str, run) -> TrialResult:
    return TrialResult(run.info.run_id, run.data.tags[tracking.TRIAL_KEY_TAG], run.info.status,
                       M.finals(run.data.metrics), skipped=True)


def open_run(cfg: TrialConfig, uri: str, parent_run_id: str | None,
             tags: dict[str, str] | None = None) -> tuple[str, Any | None]:
    """The trial's run id: a finished run is returned as is, an unfinished one is resumed."""
    experiment_id = tracking.ensure_experiment(cfg.experiment, uri)
    notice = tracking.stale_key_notice(uri, experiment_id, NUMERICS_VERSIONS["trial"])
    if notice:
        print(notice, file=sys.stderr, flush=True)
    finished = tracking.finished_run(uri, experiment_id, tracking.TRIAL_KEY_TAG, cfg.key())
    if finished is not None:
        return finished.info.run_id, finished
    run = tracking.find_run(uri, experiment_id, tracking.TRIAL_KEY_TAG, cfg.key())
    if run is not None:
        tracking.resume_run(uri, run.info.run_id)
        return run.info.run_id, None
    note = deleted_run_note(uri, experiment_id, cfg)
    if note:  # its checkpoints belong to that run: training starts over
        print(f"ternarylm: {note}", file=sys.stderr, flush=True)
    tags = {tracking.TRIAL_KEY_TAG: cfg.key(),
            tracking.NUMERICS_VERSION_TAG: str(NUMERICS_VERSIONS["trial"]),
            "ternarylm.size": cfg.size,
            "ternarylm.scheme": cfg.scheme, "ternarylm.plan": cfg.plan.name, **(tags or {})}
    run_id = tracking.start_run(uri, experiment_id, cfg.run_name, tags, parent_run_id)
    return run_id, None


def deleted_run_note(uri: str, experiment_id: str, cfg: TrialConfig) -> str | None:
    """The line for a trial with no live run but a deleted one: it trains again from the start
    (its checkpoints belong to the deleted run); None otherwise."""
    if tracking.find_run(uri, experiment_id, tracking.TRIAL_KEY_TAG, cfg.key()) is not None:
        return None
    deleted = tracking.find_run(uri, experiment_id, tracking.TRIAL_KEY_TAG, cfg.key(),
                                deleted=True)
    if deleted is None:
        return None
    return (f"trial {cfg.run_name}: its earlier MLflow run {deleted.info.run_id} "
            f"({deleted.info.status} when deleted) was deleted; training it again from the "
            f"start under a new run")


def quarantine_note(uri: str, experiment: str, cfg: TrialConfig) -> str | None:
    """The line for a trial whose newest checkpoint(s) could not be loaded: which were renamed
    and where it resumed (the workers' tag); None otherwise."""
    run = tracking.find_trial_run(uri, experiment, cfg.key())
    tag = run.data.tags.get(QUARANTINED_TAG) if run is not None else None
    return f"trial {cfg.run_name}: {tag}" if tag else None


def make_trainer(cfg: TrialConfig, entry: Callable[[dict[str, bytes]], None],
                 loop_config: dict[str, bytes], name: str, callbacks: list | None = None):
    """A TorchTrainer of `cfg`'s workers (resources, backend, storage, failure budget) running
    `entry` (a trial's or a cohort's loop), its Ray Train run called `name`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    return TorchTrainer(
        entry,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path(cfg),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             callbacks=callbacks or []),
    )


def build_trainer(cfg: TrialConfig, runtime: TrialRuntime, callbacks: list | None = None):
    # Named by key and MLflow run: a resumed run finds its checkpoints; a new run (a new
    # tracking store, or a run deleted) never resumes another run's finished checkpoint.
    return make_trainer(cfg, train_worker, payload(cfg, runtime),
                        f"trial-{cfg.key()}-{runtime.run_id[:12]}", callbacks)


def preflight(cfgs: list[TrialConfig], uri: str) -> tuple[str | None, dict[str, Any]]:
    """Every check before an MLflow run exists (bad input leaves no run half made), then Ray
    joined or started; returns the cluster's address (None: a cluster of our own) and each
    corpus prepared, by `repr` of its DataConfig."""
    for path in {storage_path(c) for c in cfgs}:
        check_storage(path)
    address = ray_address()
    # Fails on bad data before any worker starts; workers hit the cache.
    prepared = {key: prepare_data(data) for key, data in {repr(c.data): c.data
                                                          for c in cfgs}.items()}
    tracking.check_tracking(uri)
    address = connect_ray(address)
    check_capacity(cfgs)
    return address, prepared


def fit_trainer(trainer, uri: str, run_ids: list[str], watch: str | None, what: str):
    """Ray Train's fit(); when it fails, every run it trained is marked FAILED and TrialFailed
    names the cause (KILLED on Ctrl-C, re-raised)."""
    try:
        with cluster_watch(watch, uri, run_ids[0], what):
            return trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C: the runs say they are not done; the CLI says what to do
        for run_id in run_ids:
            tracking.end_run(uri, run_id, "KILLED", INTERRUPTED)
        raise
    except Exception as e:
        cause = last_line(e)
        for run_id in run_ids:
            tracking.end_run(uri, run_id, "FAILED", f"training failed: {cause}")
        raise TrialFailed(f"{what} failed: {cause}; when its cause is fixed, run the same "
                          f"command again to resume from its last checkpoint") from e


def run_trial(cfg: TrialConfig, *, parent_run_id: str | None = None,
              callbacks: list | None = None, tracking_uri: str | None = None,
              tags: dict[str, str] | None = None) -> TrialResult:
    """Train one model to the end (or resume it), returning its final metrics.

    Raises TrialFailed, with the MLflow run marked FAILED and the reason tagged, when the loss
    diverges or the workers exhaust their failure budget.
    """
    t0 = time.perf_counter()
    uri = tracking_uri or tracking.tracking_uri()
    address, prepared = preflight([cfg], uri)
    run_id, finished = open_run(cfg, uri, parent_run_id, tags)
    if finished is not None:
        return existing_result(uri, finished)
    tracking.log_params(uri, run_id, cfg.flat())
    run_inputs.log_datasets(uri, run_id, cfg.data, prepared[repr(cfg.data)])
    t1 = time.perf_counter()
    # Set before the trainer is built: its payload is the runtime pickled (`worker.payload`).
    runtime = TrialRuntime(uri, run_id, launched_at=time.time())
    trainer = build_trainer(cfg, runtime, callbacks)
    quarantined = tracking.client(uri).get_run(run_id).data.tags.get(QUARANTINED_TAG)
    # Inside a study's Tune actor the cluster's loss ends the actor; watch only as a CLI.
    watch = address if parent_run_id is None else None
    result = fit_trainer(trainer, uri, [run_id], watch, f"trial {cfg.run_name}")
    now = tracking.client(uri).get_run(run_id).data.tags.get(QUARANTINED_TAG, quarantined)
    if now != quarantined:  # said by this launch's workers
        print(f"ternarylm: trial {cfg.run_name}: {now}", file=sys.stderr, flush=True)
    times = {M.SETUP_S: t1 - t0, M.FIT_S: time.perf_counter() - t1}
    out = settle(uri, run_id, cfg, times, (result.metrics or {}).get(M.TRAIN_LOOP_S))
    if out.failure:
        raise TrialFailed(out.failure)
    return out


def settle(uri: str, run_id: str, cfg: TrialConfig, times: dict[str, float],
           loop_s: float | None) -> TrialResult:
    """After its workers ended: a run they ended early (a full disk, a diverged loss) FAILED
    with the reason, any other's plots and FINISHED, with this launch's phase times (`times`:
    setup and fit) and its time outside the loop."""
    started = time.perf_counter()
    run = tracking.client(uri).get_run(run_id)
    failure = ending_failure(uri, run, cfg.run_name)
    if failure:
        return TrialResult(run_id, cfg.key(), "FAILED", failure=failure)
    t_model = time.perf_counter()
    logged_model.log_trial_model(uri, run_id, cfg)
    model_s = time.perf_counter() - t_model
    finish_run(uri, run_id, cfg, run.data.metrics)
    seconds = times | {M.FINISH_S: time.perf_counter() - started}
    if loop_s is not None:  # absent when resumed at the last step
        seconds[M.OUTSIDE_TRAINING_S] = sum(seconds.values()) - loop_s
    seconds[M.LOGGED_MODEL_S] = model_s
    tracking.log_at_last_step(uri, run_id, seconds)
    return TrialResult(run_id, cfg.key(), "FINISHED",
                       M.finals(tracking.client(uri).get_run(run_id).data.metrics),
                       seconds=seconds)


def ending_failure(uri: str, run, name: str) -> str | None:
    """When its workers ended the run early and tagged why (a full disk, a loss that diverged:
    Ray Train keeps only checkpointed reports), fail the run and say what to do; else None."""
    run_id = run.info.run_id
    full = run.data.tags.get(tracking.DISK_FULL_TAG)
    if full:
        tracking.end_run(uri, run_id, "FAILED", full)
        return (f"trial {name}: {full}; free space there (or choose another storage_path) and "
                f"run the same command again to resume from its last checkpoint")
    diverged = run.data.tags.get(DIVERGED_TAG)
    if diverged:
        tracking.end_run(uri, run_id, "FAILED", f"diverged: {diverged}")
        return (f"trial {name} diverged: {diverged}; lower train.lr or raise "
                f"train.warmup_steps, or clip harder (train.grad_clip)")
    return None


def finish_run(uri: str, run_id: str, cfg: TrialConfig, latest: dict[str, float]) -> None:
    """Plots on the run (from its stored metrics), then mark it FINISHED."""
    with tempfile.TemporaryDirectory() as d:
        series = {name: tracking.metric_history(uri, run_id, name)
                  for name in (M.TRAIN_LOSS, M.VAL_LOSS, M.TRAIN_SAMPLE_LOSS)}
        plots.loss_curves(series, Path(d, "loss_curves.png"), cfg.run_name)
        sparsity = M.block_values(latest)
        if sparsity:
            plots.block_sparsity_bars(sparsity, Path(d, "block_sparsity.png"), cfg.run_name)
        tracking.log_artifact(uri, run_id, d, "plots")
    tracking.end_run(uri, run_id, "FINISHED")
