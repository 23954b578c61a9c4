"""Cohorts: trials of one shape trained by one Ray Train worker group, in one DeepSpeed engine.

A study groups its trials by `shape` (model shape, batch, steps, cadences, data and resources:
what one engine and one loop must share) into cohorts of at most `study.cohort_size` members;
each member keeps its own seed, learning rate and schedule, weight decay, betas, clipping,
label smoothing, scheme and plan (`ternarylm.training.cohort_train`). Each member is still a trial: its
own key, MLflow run, artifacts, `final/` summary and results row; a finished member is skipped,
and a cohort of one pending member trains as a plain trial.

Cohorts are off (each trial trains alone) where one engine cannot hold the members exactly:
  * bf16 or ZeRO stages that partition (several workers at stage 1-3, or stage 3): DeepSpeed's
    bf16 and ZeRO optimizers flatten the parameters, and `MemberAdamW` needs the members'
    leading axis;
  * dropout: one random stream draws the masks of the whole stacked batch, so a member's masks
    would not be its solo trial's;
  * an early-stopping scheduler (ASHA): it stops a Tune trial, which would stop every member.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ternarylm.core import metrics as M
from ternarylm.training import run_inputs
from ternarylm import tracking
from ternarylm.config import TrialConfig
from ternarylm.training.train import bf16_of, zero_stage
from ternarylm.training.trial import (TrialResult, existing_result, fit_trainer, make_trainer,
                             open_run, preflight, run_trial, settle)
from ternarylm.training.worker import TrialRuntime, cohort_payload, cohort_worker

DEFAULT_COHORT_SIZE = 8
"""Members per cohort unless the study says (`cohort_size`)."""
COHORT_TAG = "ternarylm.cohort"
"""On a trial run trained in a cohort: the cohort's Ray Train run name."""


def eligible(t: TrialConfig) -> bool:
    """Whether the trial can train in a cohort (see the module's docstring for why not)."""
    return not bf16_of(t) and zero_stage(t, False) == 0 and t.dropout == 0


def shape(t: TrialConfig) -> tuple[Any, ...]:
    """What the members of one cohort share: one model shape, batch, step count, cadence,
    corpus and worker group."""
    r = t.train
    return (t.size, t.seq_len, t.tie_head, t.block, repr(t.data), t.num_workers,
            t.cpus_per_worker, t.use_gpu, t.max_failures, t.storage_path, r.steps,
            r.micro_batch, r.grad_accum, r.eval_every, r.eval_max_tokens,
            r.train_sample_tokens, r.checkpoint_every, r.log_every)


def form_cohorts(trials: list[TrialConfig], limit: int) -> list[list[TrialConfig]]:
    """The trials in cohorts of one shape, at most `limit` members each, in the trials' order;
    a trial that cannot join one (`eligible`) is a cohort of its own."""
    groups: dict[Any, list[list[TrialConfig]]] = {}
    cohorts: list[list[TrialConfig]] = []
    for t in trials:
        if not eligible(t):
            cohorts.append([t])
            continue
        open_ = groups.setdefault(shape(t), [])
        if not open_ or len(open_[-1]) >= limit:
            open_.append([])
            cohorts.append(open_[-1])
        open_[-1].append(t)
    return cohorts


def run_cohort(trials: list[TrialConfig], *, parent_run_id: str | None = None,
               callbacks: list | None = None, tracking_uri: str | None = None,
               tags: dict[str, str] | None = None) -> list[TrialResult]:
    """Train the cohort's unfinished members together (or resume them), each in its own run;
    returns every member's result in order. A member that diverged is FAILED (its `failure`
    says why) while the others finish; a failure of the worker group raises TrialFailed."""
    t0 = time.perf_counter()
    uri = tracking_uri or tracking.tracking_uri()
    _, prepared = preflight(trials, uri)
    results: dict[str, TrialResult] = {}
    pending: list[tuple[TrialConfig, str]] = []
    for t in trials:
        run_id, finished = open_run(t, uri, parent_run_id, tags)
        if finished is not None:
            results[t.key()] = existing_result(uri, finished)
        else:
            pending.append((t, run_id))
    if len(pending) == 1:
        t = pending[0][0]
        results[t.key()] = run_trial(t, parent_run_id=parent_run_id, callbacks=callbacks,
                                     tracking_uri=uri, tags=tags)
    elif pending:
        results |= _train_together(pending, uri, callbacks, t0, prepared)
    return [results[t.key()] for t in trials]


def _train_together(pending: list[tuple[TrialConfig, str]], uri: str, callbacks: list | None,
                    t0: float, prepared: dict[str, Any]) -> dict[str, TrialResult]:
    for t, run_id in pending:
        tracking.log_params(uri, run_id, t.flat())
        run_inputs.log_datasets(uri, run_id, t.data, prepared[repr(t.data)])
    t1 = time.perf_counter()
    members = [t for t, _ in pending]
    run_ids = [run_id for _, run_id in pending]
    runtimes = [TrialRuntime(uri, run_id, launched_at=time.time()) for run_id in run_ids]
    # Named by its members' runs: the same members launched again resume its checkpoint.
    name = f"cohort-{hashlib.sha256(' '.join(run_ids).encode()).hexdigest()[:16]}"
    for run_id in run_ids:
        tracking.set_tags(uri, run_id, {COHORT_TAG: name})
    trainer = make_trainer(members[0], cohort_worker, cohort_payload(members, runtimes), name,
                           callbacks)
    result = fit_trainer(trainer, uri, run_ids, None,
                         f"cohort of {len(members)} ({members[0].run_name} ...)")
    times = {M.SETUP_S: t1 - t0, M.FIT_S: time.perf_counter() - t1}
    loop_s = (result.metrics or {}).get(M.TRAIN_LOOP_S)
    return {t.key(): settle(uri, run_id, t, times, loop_s) for t, run_id in pending}
