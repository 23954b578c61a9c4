"""MLflow: where runs live, one run per trial nested under its study, metrics without duplicates.

The tracking URI comes from $MLFLOW_TRACKING_URI; without it, a SQLite store under
$TERNARYLM_HOME (default ~/.ternarylm). Runs are created by drivers, never by training workers,
so a restarted worker continues the same run; only rank 0 logs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.tracking import MlflowClient

import ternarylm
from ternarylm.core import metrics
from ternarylm.config import ConfigError, ternarylm_home

TRIAL_KEY_TAG = "ternarylm.trial_key"
NUMERICS_VERSION_TAG = "ternarylm.numerics_version"
"""On a trial run: the trial numerics version its key was made with (`ternarylm.core.identity`);
on an experiment: the version whose stale-key notice was given."""
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
_PARAM_BATCH, _METRIC_BATCH = 100, 1000  # MLflow's REST API caps of one log_batch


def quiet_mlflow() -> None:
    """Keep MLflow's INFO chatter (store creation, migrations) and its artifact progress bars
    off the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = ternarylm_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and uri not in _OPENED_STORES:
        return _open_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


_OPENED_STORES: set[str] = set()
"""The SQLite stores this process has opened (MLflow keeps one store object per URI)."""


def _open_sqlite_store(uri: str) -> MlflowClient:
    """A client of a SQLite store, opened under a lock file beside it: the first client of a
    brand-new store creates its tables and migrates them, and two processes doing that at once
    collide ("table latest_metrics already exists"); under the lock the second finds it made."""
    db = Path(uri.removeprefix("sqlite:///"))
    with open(db.with_name(f"{db.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or by the kernel if we die
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    _OPENED_STORES.add(uri)
    return c


@contextmanager
def global_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then put back. A few
    MLflow calls ignore their client's URI and use it: `Model.log`, and the SQL registry's
    `create_model_version`, which looks a `models:/<id>` source up with `MlflowClient()`.
    `set_tracking_uri` mirrors the URI into MLFLOW_TRACKING_URI, so that variable is what was."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def check_tracking(uri: str) -> None:
    """Fail fast, in one line, when the tracking server does not answer."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means no run can be recorded
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"MLflow tracking URI {uri} does not answer ({first_line[:200]}); "
                          f"start the server or unset MLFLOW_TRACKING_URI to use the local "
                          f"SQLite store") from None


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it (once, in a driver) if needed."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older ternarylm
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # A SQLite store's default artifact root is relative to the current directory, which a
        # `ray job submit` working dir deletes; keep artifacts beside the database instead.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        # The kind tag lists the experiment as "Machine learning"; which view opens is the
        # link's choice (`ui_link`).
        return c.create_experiment(name, artifact_location=artifact_location,
                                   tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(name).experiment_id  # created meanwhile by another driver


def find_run(uri: str, experiment_id: str, tag: str, value: str,
             *conditions: str, deleted: bool = False) -> Any | None:
    """The newest run tagged `tag` = `value` that also meets every filter of `conditions`
    (among the deleted runs when `deleted`)."""
    where = " and ".join([f"tags.`{tag}` = '{value}'", *conditions])
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    runs = client(uri).search_runs([experiment_id], filter_string=where, run_view_type=view,
                                   order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_trial_run(uri: str, experiment: str, key: str) -> Any | None:
    """The newest run of the trial with this content key, if any."""
    experiment_id = ensure_experiment(experiment, uri)
    return find_run(uri, experiment_id, TRIAL_KEY_TAG, key)


def finished_run(uri: str, experiment_id: str, key_tag: str, key: str,
                 parent_run_id: str | None = None) -> Any | None:
    """The one skip rule of every keyed step (trial, GLUE fine-tune, lm-eval run): the newest
    FINISHED run tagged `key_tag` = `key` (under `parent_run_id` when given) is its result, and
    the step is not run again. Anything else (no run, RUNNING, FAILED, KILLED) is not done."""
    parent = [f"tags.`{PARENT_TAG}` = '{parent_run_id}'"] if parent_run_id else []
    return find_run(uri, experiment_id, key_tag, key, "attributes.status = 'FINISHED'", *parent)


def stale_key_notice(uri: str, experiment_id: str, version: int) -> str | None:
    """One line when the experiment holds trial runs keyed under another trial numerics version
    (or before versions existed): their trials cannot match a current key, so they train again.
    Said once per experiment and version (the experiment is tagged with the version after)."""
    c = client(uri)
    if c.get_experiment(experiment_id).tags.get(NUMERICS_VERSION_TAG) == str(version):
        return None
    stale, token = 0, None
    while True:
        page = c.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` LIKE '%'",
                             max_results=1000, page_token=token)
        stale += sum(r.data.tags.get(NUMERICS_VERSION_TAG) != str(version) for r in page)
        token = page.token
        if not token:
            break
    c.set_experiment_tag(experiment_id, NUMERICS_VERSION_TAG, str(version))
    if not stale:
        return None
    return (f"note: MLflow experiment {c.get_experiment(experiment_id).name!r} holds {stale} "
            f"trial run(s) keyed before trial numerics version {version} (keys now hash every "
            f"setting, defaults included, and the code's numerics version): those trials train "
            f"again under new keys; their old runs are left as they are")


def start_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    """A new run (RUNNING) with our tags, the package version and its source (the parent's,
    for a trial of a study: its driver is a Tune actor, not the command that ran)."""
    tags = {**tags, "ternarylm.version": ternarylm.__version__, "mlflow.runName": run_name}
    tags |= source_tags(uri, parent_run_id)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return client(uri).create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


FAILURE_TAG = "ternarylm.failure"
"""Why a run ended without finishing (set by `end_run`, cleared when it resumes)."""
STOPPED_EARLY_TAG = "ternarylm.stopped_early"
"""On a run an early-stopping scheduler (ASHA) ended: its result was ruled on (cleared when it
resumes)."""

DISK_FULL_TAG = "ternarylm.disk_full"
"""On a trial's run whose workers stopped on a full disk: where, and the space needed (the driver
fails the run with it; cleared when it resumes)."""
UNFINISHED_TAG = "ternarylm.unfinished"
"""On a study's run that was interrupted: the trials left unfinished (cleared when it resumes)."""


def resume_run(uri: str, run_id: str) -> None:
    c = client(uri)
    tags = c.get_run(run_id).data.tags
    for stale in (FAILURE_TAG, STOPPED_EARLY_TAG, UNFINISHED_TAG, DISK_FULL_TAG):  # an earlier ending's marks
        if stale in tags:
            c.delete_tag(run_id, stale)
    c.update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    c = client(uri)
    if reason:
        c.set_tag(run_id, FAILURE_TAG, reason[:4000])
    c.set_terminated(run_id, status=status)


@contextmanager
def child_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
              parent_run_id: str, step: str) -> Iterator[str]:
    """A run nested under `parent_run_id` for one `step` on a trained model (a GLUE fine-tune,
    an lm-eval run): FINISHED when the body returns; FAILED with the error, re-raised, when
    it does not (Ctrl-C included), so a rerun never mistakes it for done."""
    run_id = start_run(uri, experiment_id, run_name, tags, parent_run_id=parent_run_id)
    try:
        yield run_id
    except BaseException as err:
        end_run(uri, run_id, "FAILED", f"{step} failed: {err}")
        raise
    end_run(uri, run_id, "FINISHED")


def log_metrics(uri: str, run_id: str, items: list[Metric]) -> None:
    """Metrics in batches of the REST API's limit."""
    c = client(uri)
    for i in range(0, len(items), _METRIC_BATCH):
        c.log_batch(run_id, metrics=items[i:i + _METRIC_BATCH])


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params once; a run resumed with the same config re-logs nothing."""
    c = client(uri)
    existing = c.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), _PARAM_BATCH):
        c.log_batch(run_id, params=items[i:i + _PARAM_BATCH])


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
               "mlflow.source.git.dirty")
"""What the UI's Source column shows (name, and the commit beside it), and whether the
working tree had uncommitted changes (`mlflow.source.git.dirty`, ours: MLflow has none)."""


def source_tags(uri: str, parent_run_id: str | None = None) -> dict[str, str]:
    """The running command (`ternarylm train`, `studies/scaling.py`...) and the package's git
    commit and dirty flag; a child run copies its parent's."""
    if parent_run_id:
        parent = client(uri).get_run(parent_run_id).data.tags
        return {k: parent[k] for k in SOURCE_TAGS if k in parent}
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    name = " ".join([script, *sys.argv[1:2]]) if script == "ternarylm" else script
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["mlflow.source.git.dirty"] = str(_git("status", "--porcelain",
                                                   "--untracked-files=no") != "").lower()
    return tags


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git(*args: str) -> str:
    """The package checkout's `git ARGS` output ("" outside a checkout or without git)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def ui_link(uri: str, experiment_id: str) -> str:
    """Where the experiment's runs open in the UI's model-training view. MLflow 3's UI picks
    its view from the link's `workflowType`, else from the browser's last choice, else GenAI:
    it ignores the experiment's kind tag (mlflow/server/js: `useExperimentKind` reads the
    workflow type whenever the workflow switch is on, and the switch is always on)."""
    path = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path} (after `mlflow ui --backend-store-uri {uri}`)"


class Tracker(Protocol):
    """What a training loop records, wherever it is stored: metrics by step, tags, artifacts
    and the closing summary. Every call is a no-op on ranks that do not log."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_summary(self) -> None: ...


class MlflowTracker:
    """The Tracker of one MLflow run: buffered metrics written in batches, each step at most
    once.

    After a restart from a checkpoint at step S, training recomputes steps S+1.. that may
    already be in MLflow; the last logged step is read at start so those are not written twice.
    """

    def __init__(self, uri: str, run_id: str, enabled: bool, progress_key: str) -> None:
        self.uri, self.run_id, self.enabled, self.progress_key = uri, run_id, enabled, progress_key
        self.buffer: list[Metric] = []
        self.last_logged = -1
        if enabled:
            history = client(uri).get_metric_history(run_id, progress_key)
            self.last_logged = max((m.step for m in history), default=-1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or step <= self.last_logged:
            return
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if not self.enabled or not self.buffer:
            return
        log_metrics(self.uri, self.run_id, self.buffer)
        self.buffer = []

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            set_tags(self.uri, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            log_artifact(self.uri, self.run_id, path, artifact_path)

    def log_summary(self) -> None:
        """`final/...` metrics from the run's latest values (the stored ones, so a trial
        resumed after its last step still gets its summary)."""
        if not self.enabled:
            return
        latest = client(self.uri).get_run(self.run_id).data.metrics
        _log_at_step_of(self.uri, self.run_id, metrics.summary_of(latest), self.progress_key)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def log_at_last_step(uri: str, run_id: str, values: dict[str, float]) -> None:
    """Log `values` (and their `final/` summaries) at the run's last training step: what a
    driver measures about a run its workers have finished."""
    _log_at_step_of(uri, run_id, values | metrics.summary_of(values), metrics.TRAIN_LOSS)


def _log_at_step_of(uri: str, run_id: str, values: dict[str, float], progress_key: str) -> None:
    """Log `values` at the last step `progress_key` was logged at (0 if never)."""
    step = max((s for s, _ in metric_history(uri, run_id, progress_key)), default=0)
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    c = client(uri)
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)
