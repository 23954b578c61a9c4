"""Studies: a grid of trials (sizes x schemes x plans x seeds) scheduled by Ray Tune.

Each Tune trial is a small function that launches its trial's `TorchTrainer` (Ray Train V2
pattern: the trainer is not handed to `tune.Tuner`). A study is one MLflow parent run; trials are
keyed by a hash of their config, so running a study again skips finished trials, resumes
unfinished ones from their checkpoints, and trains only cells added to the config.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ternarylm.core import metrics as M
from ternarylm.training import run_inputs
from ternarylm import tracking
from ternarylm.model.stats import has_ternary_layers
from ternarylm.training.cohort import DEFAULT_COHORT_SIZE, form_cohorts, run_cohort
from ternarylm.core.identity import NUMERICS_VERSIONS
from ternarylm.config import ConfigError, TrialConfig, _build, load_yaml, ternarylm_home
from ternarylm.orchestration.lr_search import (SEARCH_TAG, Choice, LRSearchConfig, choose, search_trials,
                                 with_lr)
from ternarylm.model.recipes import recipe_overrides
from ternarylm.model.transformer import ModelConfig
from ternarylm.model.plans import PrecisionPlan
from ternarylm.orchestration.progress import StudyClock
from ternarylm.model.quantizers import TERNARY_SCHEMES
from ternarylm.training.cluster import (DRIVER_RESOURCE, check_capacity, check_storage, cluster_watch,
                               connect_ray, keep_worker_logs, ray_address, verbose)
from ternarylm.training.cluster import storage_path as trial_storage_path
from ternarylm.core.errors import Fault, Interrupted
from ternarylm.training.trial import (INTERRUPTED, deleted_run_note, last_line, quarantine_note,
                             run_trial)

STUDY_TAG = "ternarylm.study"
STOPPED_EARLY = "stopped early by the scheduler"
"""Why a trial's run ended KILLED when the scheduler (ASHA) stopped it."""


@dataclass
class StudyConfig:
    name: str = "scaling"
    """Study name: the MLflow parent run, and the key that lets a rerun continue the study."""
    sizes: list[str] = field(default_factory=lambda: ["tiny", "micro", "mini"])
    """Model sizes (see `ternarylm describe`)."""
    schemes: list[str] = field(default_factory=lambda: ["absmean", "learned"])
    """Ternary scaling-factor schemes."""
    plans: list[Any] = field(default_factory=lambda: ["fp", "all_ternary"])
    """Precision plans: preset names or mappings of plan fields."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; several give cross-seed mean, std and significance tests."""
    tokens: int | None = None
    """Training tokens per trial (fixed budget); exclusive with tokens_per_param."""
    tokens_per_param: float | None = None
    """Training tokens = this x non-embedding parameters (20 is Chinchilla-optimal)."""
    warmup_fraction: float = 0.1
    """Warmup steps as a fraction of each trial's steps."""
    evals_per_trial: int = 4
    """Evaluations (and checkpoints) per trial; the last is at the final step."""
    trial: dict[str, Any] = field(default_factory=dict)
    """Settings shared by every trial (TrialConfig fields: seq_len, data, train, num_workers...)."""
    per_size: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Trial settings for one size, merged over `trial` (e.g. {large: {train: {lr: 3e-4}}})."""
    max_concurrent: int = 2
    """Trials running at once."""
    scheduler: str = "fifo"
    """`fifo` (every trial to the end: right for fits) or `asha` (early stopping)."""
    assumed_mfu: float = 0.35
    """Model FLOPs utilisation assumed by the dry run's GPU-hour estimate."""
    gpu_peak_flops: float = 989e12
    """Peak FLOP/s of one GPU for that estimate (H100 dense bf16)."""
    glue_tasks: list[str] = field(default_factory=list)
    """GLUE tasks to fine-tune every finished trial on (mrpc, sst2, cola)."""
    glue: dict[str, Any] = field(default_factory=dict)
    """GLUE fine-tuning settings (ternarylm.evaluation.glue.GlueSettings fields: epochs, lr, ...)."""
    glue_data_dir: str | None = None
    """Folder of GLUE TSVs (<dir>/MRPC/train.tsv, ...); None loads them from the hub."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run on every finished trial (a child MLflow run each)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """How (ternarylm.evaluation.harness.EvalSettings fields: packed, limit, num_fewshot, include_path,
    batch_size)."""
    recipes: list[str] = field(default_factory=list)
    """Named recipes (ternarylm.model.recipes: fp, paper, bitnet_b158, trilm, paretoq): an axis that
    replaces schemes x plans, each recipe bringing its block, scheme, plan and schedule."""
    lr_search: dict[str, Any] | None = None
    """A learning-rate search per cell before its trials (ternarylm.orchestration.lr_search.LRSearchConfig:
    values or low/high/num, budget_fraction, scheduler)."""
    cohorts: bool = True
    """Train trials of one shape together, in one worker group and engine (ternarylm.training.cohort);
    false (`--no-cohorts`) trains each trial alone."""
    cohort_size: int = DEFAULT_COHORT_SIZE
    """Most members in one cohort."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("study.name is empty: name the study (its MLflow parent run)")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name) or set(self.name) == {"."}:
            # The name makes a folder (the Tune run's `study-<name>-<time>`) and a file (the
            # study's lock, `.study-<name>.lock`): a slash or a `..` would put them elsewhere.
            raise ConfigError(f"study.name {self.name!r} may hold only letters, digits, '.', "
                              f"'_' and '-'; rename the study")
        for name in ("sizes", "schemes", "plans", "seeds"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise ConfigError(f"study.{name} must be a non-empty list, got {value!r}")
        if len(set(map(repr, self.seeds))) < len(self.seeds):
            raise ConfigError(f"study.seeds repeats a seed ({self.seeds}); list each seed once "
                              f"(a repeated seed trains the same model twice)")
        for scheme in self.schemes:
            if scheme not in TERNARY_SCHEMES:
                raise ConfigError(f"study.schemes: unknown scheme {scheme!r}; choose from "
                                  f"{', '.join(TERNARY_SCHEMES)}")
        if (self.tokens is None) == (self.tokens_per_param is None):
            raise ConfigError("study: give exactly one of tokens (a fixed budget per trial) or "
                              "tokens_per_param (budget = k x parameters)")
        budget = self.tokens if self.tokens is not None else self.tokens_per_param
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ConfigError(f"study: the token budget must be positive, got {budget!r}")
        if self.scheduler not in ("fifo", "asha"):
            raise ConfigError(f"study.scheduler must be fifo or asha, got {self.scheduler!r}")
        if self.cohort_size < 1:
            raise ConfigError(f"study.cohort_size must be a positive integer (the most trials "
                              f"trained together), got {self.cohort_size!r}; set it to 1 or "
                              f"more, or turn cohorts off with cohorts: false (--no-cohorts)")
        if self.max_concurrent < 1 or self.evals_per_trial < 1:
            raise ConfigError("study.max_concurrent and study.evals_per_trial must be >= 1")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"study.warmup_fraction must be in [0, 1), got "
                              f"{self.warmup_fraction}")
        if "train" in self.trial and "steps" in self.trial["train"]:
            raise ConfigError("study.trial.train.steps is set by the study from its token "
                              "budget; remove it and set tokens or tokens_per_param")
        unknown = sorted(set(self.per_size) - set(self.sizes))
        if unknown:
            raise ConfigError(f"study.per_size names size(s) not in study.sizes: "
                              f"{', '.join(unknown)}")
        self.plans = [PrecisionPlan.from_config(p) for p in self.plans]
        for name in self.recipes:
            recipe_overrides(name)  # an unknown name is one line naming the known ones
        if self.glue_tasks:
            from ternarylm.evaluation.glue import GlueSettings, task_spec
            for task in self.glue_tasks:
                task_spec(task)
            GlueSettings.from_dict(self.glue)
        if self.eval_tasks:
            from ternarylm.evaluation.harness import EvalSettings
            _build(EvalSettings, self.eval, "study.eval").check_tasks(self.eval_tasks)
        self.search = (_build(LRSearchConfig, self.lr_search, "study.lr_search")
                       if self.lr_search is not None else None)
        self.trials()  # every cell must be a valid trial before anything starts

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        return _build(cls, load_yaml(path), "study")

    def _trial(self, size: str, seed: int, cell: dict[str, Any]) -> TrialConfig:
        """The trial of one cell (its scheme and plan, or its recipe's overrides) and seed,
        its steps and cadences from the study's token budget."""
        shared = merge(merge(self.trial, self.per_size.get(size, {})), cell)
        base = TrialConfig.from_dict({**shared, "size": size, "seed": seed})
        params = base.model_config(256).param_counts()["params_non_embedding"]
        tokens = self.tokens or int(self.tokens_per_param * params)
        steps = max(2, math.ceil(tokens / base.global_batch_tokens))
        every = max(1, steps // self.evals_per_trial)
        train = {**shared.get("train", {}), "steps": steps,
                 "warmup_steps": min(steps - 1, int(self.warmup_fraction * steps)),
                 "eval_every": every, "checkpoint_every": every, "log_every": min(10, every)}
        return TrialConfig.from_dict({**shared, "size": size, "seed": seed, "train": train,
                                      "experiment": shared.get("experiment", "ternarylm")})

    def _cell_axis(self, size: str) -> list[tuple[str, dict[str, Any]]]:
        """(cell label, trial overrides) of one size: each recipe, or each scheme x plan (a
        plan without ternary layers, such as fp, once rather than once per scheme)."""
        if self.recipes:
            return [(name, recipe_overrides(name) | {"recipe": name}) for name in self.recipes]
        axis = []
        for plan in self.plans:
            first = self._trial(size, self.seeds[0], {"scheme": self.schemes[0], "plan": plan})
            ternary = has_ternary_layers(first.shape, plan)
            for scheme in self.schemes if ternary else self.schemes[:1]:
                label = f"{scheme if ternary else '-'}/{plan.name}"
                axis.append((label, {"scheme": scheme, "plan": plan}))
        return axis

    def cells(self) -> dict[str, list[TrialConfig]]:
        """The grid by cell (size/scheme/plan, or size/recipe), each cell's trials one per
        seed; a trial two cells share (same key) trains once."""
        cells: dict[str, list[TrialConfig]] = {}
        seen: set[str] = set()
        for size in self.sizes:
            for label, overrides in self._cell_axis(size):
                for seed in self.seeds:
                    t = self._trial(size, seed, overrides)
                    if t.key() not in seen:
                        seen.add(t.key())
                        cells.setdefault(f"{size}/{label}", []).append(t)
        return cells

    def trials(self) -> list[TrialConfig]:
        """The grid, one trial per distinct config (at the configured learning rate)."""
        return [t for trials in self.cells().values() for t in trials]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over a deep copy of `base`, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def trial_vocab(t: TrialConfig) -> tuple[int, str]:
    """The trial's vocabulary and where it came from (token cache, tokenizer, or the size's
    default when an hf: tokenizer is not on this machine)."""
    from ternarylm.data import vocab_size

    vocab = vocab_size(t.data)
    if vocab is not None:
        return vocab, t.data.tokenizer
    default = ModelConfig.__dataclass_fields__["vocab_size"].default
    return default, f"{t.data.tokenizer} not on this machine: the model's default"


def trial_flops(t: TrialConfig, vocab: int | None = None) -> float:
    """Training FLOPs of a trial, as its `progress/flops` will log (its real vocabulary unless
    `vocab` is given)."""
    vocab = vocab if vocab is not None else trial_vocab(t)[0]
    return t.model_config(vocab).flops_per_token(t.seq_len) * t.train.steps * t.global_batch_tokens


def trial_table(study: StudyConfig) -> list[dict[str, Any]]:
    """What the study will run: params, tokens, FLOPs (with each trial's real vocabulary, as
    its `progress/flops` will log) and GPU-hours at the assumed MFU; with an lr search, its
    search trials (role `search`) beside the final ones (whose rate the search decides)."""
    rows = []
    vocabs: dict[str, tuple[int, str]] = {}

    def row(t: TrialConfig, role: str) -> dict[str, Any]:
        vocab, source = vocabs.setdefault(repr(t.data), trial_vocab(t))
        cfg = t.model_config(vocab)
        tokens = t.train.steps * t.global_batch_tokens
        flops = trial_flops(t, vocab)
        return {"role": role, "size": t.size, "scheme": t.scheme, "plan": t.plan.name,
                "seed": t.seed, "lr": t.train.lr if role == "search" or not study.search
                else None, "params": cfg.param_counts()["params_non_embedding"],
                "vocab": vocab, "vocab_source": source, "tokens": tokens,
                "steps": t.train.steps, "flops": flops,
                "gpu_hours": flops / (study.assumed_mfu * study.gpu_peak_flops) / 3600,
                "key": t.key() if role == "search" or not study.search else None}

    for trials in study.cells().values():
        if study.search:
            rows += [row(t, "search") for t in search_trials(trials[0], study.search)]
        rows += [row(t, "final") for t in trials]
    return rows


def _tune_trial(config: dict[str, Any]) -> None:
    """One Tune trial: run (or skip, or resume) the trial, then report its final metrics."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    specs: list[TrialConfig] = config["trial"]["specs"]
    # Tune actors inherit the cluster's environment, not the study driver's: pass the URI
    # (GLUE and the harness log their child runs where $MLFLOW_TRACKING_URI says).
    if config.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
    launch = {"parent_run_id": config["parent_run_id"], "callbacks": [TuneReportCallback()],
              "tracking_uri": config.get("tracking_uri"), "tags": config["tags"]}
    results = ([run_trial(specs[0], **launch)] if len(specs) == 1
               else run_cohort(specs, **launch))
    for result in results:
        if result.status == "FINISHED":
            _evaluate_trial(result.run_id, config)
    # Each member's outcome by its index in the Tune trial's `members`.
    report = {f"{k}/{i}": float(v) for i, r in enumerate(results)
              for k, v in (("skipped", r.skipped), ("failed", r.status == "FAILED"))}
    if len(results) == 1:
        result = results[0]
        report |= {M.final(k): v for k, v in result.metrics.items()}
        if M.VAL_LOSS in result.metrics:
            # A scheduler (ASHA) ranks every result by it at its time attribute, a skipped
            # trial's only result included.
            report |= {k: result.metrics[k] for k in (M.VAL_LOSS, M.VAL_BPB)
                       if k in result.metrics}
            report["step"] = specs[0].train.steps
    tune.report({**report, "skipped": float(all(r.skipped for r in results))})


def _evaluate_trial(run_id: str, config: dict[str, Any]) -> None:
    """The study's GLUE fine-tunes and lm-eval tasks of one finished trial."""
    glue = config["glue"]
    if glue["tasks"]:
        from ternarylm.evaluation.glue import GlueSettings, finetune_and_log
        for task in glue["tasks"]:
            finetune_and_log(run_id, task, GlueSettings.from_dict(glue["settings"]),
                             glue["data_dir"])
    evals = config["eval"]
    if evals["tasks"]:  # evaluate() reuses a finished evaluation with the same key
        from ternarylm.evaluation.harness import EvalSettings, evaluate
        settings = _build(EvalSettings, evals["settings"], "study.eval")
        evaluate(run_id, evals["tasks"], **dataclasses.asdict(settings))


def _study_callback(experiment: str, uri: str, clock: StudyClock):
    """A Tune callback: one progress line per evaluation and per finished trial, each starting
    with where the study stands (done, running, left, time to go), and MLflow runs closed when
    a trial stops early (ASHA) or errors, since its workers die without closing them."""
    from ray import tune

    from ternarylm.training.cluster import NodeWait

    class StudyProgress(tune.Callback):
        waiting = NodeWait()  # what trials wait for while an autoscaler adds nodes

        def on_step_begin(self, iteration, trials, **info):
            line = self.waiting.line()
            if line:
                print(f"[{clock.line()}] {line}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            clock.start(_trial_name(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # The trial's closing report (it carries `skipped`) repeats its last evaluation.
            if "skipped" in result:
                return
            steps, members = trial.config["trial"]["steps"], trial.config["trial"]["members"]
            for i, member in enumerate(members):
                # A cohort reports member i's evaluation as `<metric>/<i>`.
                suffix = "" if len(members) == 1 else f"/{i}"
                loss, bpb = result.get(M.VAL_LOSS + suffix), result.get(M.VAL_BPB + suffix)
                if loss is not None and bpb is not None:
                    print(f"[{clock.line()}] {member['name']}: step {int(result['step'])}/"
                          f"{steps}  {M.VAL_LOSS} {loss:.4f}  {M.VAL_BPB} {bpb:.4f}",
                          flush=True)

        def _close(self, trial, status: str, reason: str) -> None:
            """One line per member of the ended Tune trial (a trial, or a cohort's members)."""
            name = _trial_name(trial)
            clock.end(name)
            took = f" in {clock.finished[name]:.0f} s"
            last = trial.last_result or {}
            for i, member in enumerate(trial.config["trial"]["members"]):
                def line(text: str) -> None:
                    print(f"[{clock.line()}] {member['name']}: {text}", flush=True)

                run = tracking.find_trial_run(uri, experiment, member["key"])
                if run is not None and run.info.status == "RUNNING":
                    if reason == STOPPED_EARLY:
                        end_stopped_early(uri, run.info.run_id)
                    else:
                        tracking.end_run(uri, run.info.run_id, status, reason)
                    line(f"{status}{took}: {reason}")
                elif run is None:
                    line("no MLflow run")
                else:
                    if not last.get(f"skipped/{i}"):
                        _log_trial_wall(uri, run, clock.finished[name])
                    failure = run.data.tags.get(tracking.FAILURE_TAG)
                    bpb = M.finals(run.data.metrics).get(M.VAL_BPB)
                    line(run.info.status + took + (f": {failure}" if failure else "")
                         + (f"  {M.VAL_BPB} {bpb:.4f}" if bpb is not None else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "KILLED", STOPPED_EARLY)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", "trial errored (see the Ray Tune logs)")

    return StudyProgress()


def _log_trial_wall(uri: str, run, seconds: float) -> None:
    """The trial's wall time as the study saw it, and what of it was outside the training
    loop (Tune's actor, the driver's checks, Ray Train's launch and teardown, the export),
    with their `final/` summaries."""
    values = {M.TRIAL_WALL_S: seconds}
    loop = run.data.metrics.get(M.TRAIN_LOOP_S)
    if loop is not None:
        values[M.OUTSIDE_TRAINING_S] = seconds - loop
    tracking.log_at_last_step(uri, run.info.run_id, values)


def open_study_run(study: StudyConfig, experiment: str, uri: str) -> str:
    exp_id = tracking.ensure_experiment(experiment, uri)
    run = tracking.find_run(uri, exp_id, STUDY_TAG, study.name)
    if run is not None:
        tracking.resume_run(uri, run.info.run_id)
        return run.info.run_id
    run_id = tracking.start_run(uri, exp_id, f"study-{study.name}", {STUDY_TAG: study.name})
    flat = {k: v for k, v in dataclasses.asdict(study).items() if k not in ("trial", "plans")}
    flat["plans"] = ",".join(p.name for p in study.plans)
    tracking.log_params(uri, run_id, {f"study.{k}": v for k, v in flat.items()})
    return run_id


def _driver_resources() -> dict[str, float]:
    import ray

    if DRIVER_RESOURCE in ray.cluster_resources():
        return {"CPU": 0.0, DRIVER_RESOURCE: 0.01}
    return {"CPU": 0.01}  # Tune refuses a trial that asks for nothing


def run_study(study: StudyConfig, storage_path: str | None = None) -> dict[str, Any]:
    """Run every trial of the study through Ray Tune (after a learning-rate search per cell if
    the study asks for one), then log results, fits and plots."""
    from ternarylm.data import prepare_data

    cells = study.cells()
    trials = [t for ts in cells.values() for t in ts]
    for t in trials:  # resolved here: Tune actors see the cluster's environment, not ours
        t.storage_path = storage_path or t.storage_path or trial_storage_path(t)
    experiment = trials[0].experiment
    uri = tracking.tracking_uri()
    # Every check before the parent run exists: bad input leaves no run half made.
    for path in {t.storage_path for t in trials}:
        check_storage(path)
    address = ray_address()
    # Once, here: trials find the cache.
    caches = [(d, prepare_data(d)) for d in {repr(t.data): t.data for t in trials}.values()]
    tracking.check_tracking(uri)
    with study_lock(study.name, uri, trials[0].storage_path):
        address = connect_ray(address)
        check_capacity(trials)
        parent = open_study_run(study, experiment, uri)
        for data, cache in caches:  # the parent's Dataset column; the trials then find the rows
            run_inputs.log_datasets(uri, parent, data, cache)
        try:
            summary = _train_and_report(study, cells, _TuneRun(study, parent, uri, experiment),
                                        address)
        except (Interrupted, KeyboardInterrupt) as e:
            unfinished = ", ".join(getattr(e, "unfinished", None) or ["the study's report"])
            tracking.set_tags(uri, parent, {tracking.UNFINISHED_TAG: unfinished})
            tracking.end_run(uri, parent, "KILLED", f"interrupted; unfinished: {unfinished}")
            raise
        tracking.end_run(uri, parent, "FINISHED")
    print(f"MLflow: {tracking.ui_link(uri, tracking.ensure_experiment(experiment, uri))}",
          flush=True)
    return summary


def _train_and_report(study: StudyConfig, cells: dict[str, list[TrialConfig]],
                      tune_run: "_TuneRun", address: str | None) -> dict[str, Any]:
    """The study's trials (after its lr search), then its results on the parent run."""
    from ternarylm.orchestration.results import report_lr_search, report_study

    uri, parent, experiment = tune_run.uri, tune_run.parent, tune_run.experiment
    notice = tracking.stale_key_notice(uri, tracking.ensure_experiment(experiment, uri),
                                       NUMERICS_VERSIONS["trial"])
    if notice:  # here, once: the trials' Tune actors then find the experiment tagged
        print(notice, flush=True)
    trials = [t for ts in cells.values() for t in ts]
    print(f"study {study.name}: {len(trials)} trials, MLflow parent run {parent} at {uri}",
          flush=True)
    experiment_id = tracking.ensure_experiment(experiment, uri)
    # Said here, where the user reads: the trials' own lines go to their actors' logs.
    for note in filter(None, (deleted_run_note(uri, experiment_id, t) for t in trials)):
        print(f"note: {note}", flush=True)
    summary: dict[str, Any] = {"trained": [], "skipped": [], "errors": [], "lr_search": {}}
    with cluster_watch(address, uri, parent, f"study {study.name}"):
        if study.search:
            choices = []
            for cell, cell_trials in cells.items():
                choice = _search_cell(tune_run, cell, cell_trials[0], summary)
                choices.append(choice)
                cells[cell] = [with_lr(t, choice.lr) for t in cell_trials]
            summary["lr_search"] = report_lr_search(choices, parent, uri)
            trials = [t for ts in cells.values() for t in ts]
        tune_run.fit(trials, study.scheduler, {}, summary)
    trained = set(summary["trained"])
    for note in filter(None, (quarantine_note(uri, experiment, t) for t in trials
                              if t.run_name in trained)):
        print(f"note: {note}", flush=True)
    keep_worker_logs(uri, parent)
    summary |= report_study(study, trials, parent, uri, summary["errors"], summary["trained"])
    for key in ("trained", "skipped"):
        summary[key] = sorted(summary[key])
    return summary


class StudyRunning(Fault):
    """Another copy of the study holds its lock."""


@contextlib.contextmanager
def study_lock(name: str, uri: str, storage: str):
    """While inside, this process alone runs the study `name`: a second copy would train every
    trial again into the same MLflow runs and checkpoint folders. The lock (an flock, which the
    kernel releases when its holder dies, SIGKILL included) lies beside the SQLite store the
    copies would share, else in the local storage folder, else in $TERNARYLM_HOME; copies on
    other machines sharing a tracking server and s3:// storage are not seen."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
    elif "://" not in storage or storage.startswith("file://"):
        folder = Path(storage.removeprefix("file://")).expanduser()
    else:
        folder = ternarylm_home()
    path = folder / f".study-{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StudyRunning(f"study {name} is already running ({holder}, lock {path}); wait "
                               f"for it to end, or stop it, then run this command again to "
                               f"resume") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield


def _search_cell(tune_run: "_TuneRun", cell: str, trial: TrialConfig,
                 summary: dict[str, Any]) -> Choice:
    """Search trials of one cell (their own Tuner: ASHA compares rates within the cell only),
    and the rate that wins."""
    search = tune_run.study.search
    trials = search_trials(trial, search)
    print(f"lr search {cell}: {len(trials)} rates {', '.join(f'{c:g}' for c in search.candidates)}",
          flush=True)
    pending = pending_search_trials(tune_run.uri, trials)
    summary["skipped"] += sorted({t.run_name for t in trials} - {t.run_name for t in pending})
    if pending:
        tune_run.fit(pending, search.scheduler, {SEARCH_TAG: cell}, summary)
    losses = {}
    for t in trials:
        run = tracking.find_trial_run(tune_run.uri, t.experiment, t.key())
        done = run is not None and run.info.status == "FINISHED"
        losses[t.train.lr] = M.finals(run.data.metrics).get(M.VAL_LOSS) if done else None
    choice = choose(cell, losses, search.candidates)
    print(f"lr search {cell}: chose {choice.lr:g} (val/loss "
          f"{', '.join(f'{lr:g}: {v:.4f}' for lr, v in sorted(choice.losses.items()))})",
          flush=True)
    if choice.warning():
        print(f"warning: {choice.warning()}", flush=True)
    return choice


def end_stopped_early(uri: str, run_id: str) -> None:
    """End the run of a trial the scheduler stopped: KILLED, with the reason for people and a
    tag for `pending_search_trials` (a rule never reads the reason's text)."""
    tracking.set_tags(uri, run_id, {tracking.STOPPED_EARLY_TAG: "true"})
    tracking.end_run(uri, run_id, "KILLED", STOPPED_EARLY)


def pending_search_trials(uri: str, trials: list[TrialConfig]) -> list[TrialConfig]:
    """The search trials (or any trials under a scheduler) a (re)run still has to train: a
    trial is decided once it finished, or once the scheduler stopped it (ASHA ruled on its
    rate; training it on would waste the budget the early stop saved). A trial that failed or
    was interrupted is pending."""
    def decided(t: TrialConfig) -> bool:
        run = tracking.find_trial_run(uri, t.experiment, t.key())
        if run is None:
            return False
        return run.info.status == "FINISHED" or (
            run.info.status == "KILLED" and tracking.STOPPED_EARLY_TAG in run.data.tags)

    return [t for t in trials if not decided(t)]


@dataclass
class _TuneRun:
    """The settings every Tuner of one study shares."""

    study: StudyConfig
    parent: str
    uri: str
    experiment: str

    def fit(self, trials: list[TrialConfig], scheduler_name: str, tags: dict[str, str],
            summary: dict[str, Any]) -> None:
        """Run `trials` through one Tuner; adds names and errors to `summary`."""
        from ray import tune

        if not verbose():  # Tune's own reporter would print its banner whatever `verbose` says
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Cohorts only under fifo: an early-stopping scheduler stops a whole Tune trial.
        together = self.study.cohorts and scheduler_name == "fifo"
        groups = (form_cohorts(trials, self.study.cohort_size) if together
                  else [[t] for t in trials])
        entries = [_tune_entry(g) for g in groups]
        clock = StudyClock(self.study.max_concurrent,
                           {e["name"]: sum(map(trial_flops, g)) for e, g in zip(entries, groups)})
        scheduler = None
        if scheduler_name == "asha":
            from ray.tune.schedulers import ASHAScheduler
            # max_t past the last step: ASHA stops a trial that reaches max_t, and a trial
            # stopped as its last evaluation arrives dies before its driver finishes its run.
            scheduler = ASHAScheduler(metric=M.VAL_LOSS, mode="min", time_attr="step",
                                      max_t=max(t.train.steps for t in trials) + 1,
                                      grace_period=min(t.train.eval_every for t in trials))
        param_space = {"trial": tune.grid_search(entries),
                       "parent_run_id": self.parent,
                       "glue": {"tasks": [] if tags else self.study.glue_tasks,
                                "settings": self.study.glue, "data_dir": self.study.glue_data_dir},
                       "eval": {"tasks": [] if tags else self.study.eval_tasks,
                                "settings": self.study.eval},
                       "tracking_uri": self.uri, "tags": tags}
        tuner = tune.Tuner(
            tune.with_resources(_tune_trial, _driver_resources()),
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=self.study.max_concurrent,
                                        scheduler=scheduler, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name,
                                        reuse_actors=_reuses_actors(scheduler, param_space)),
            run_config=tune.RunConfig(
                name=f"study-{self.study.name}-{int(time.time() * 1000)}",
                storage_path=trials[0].storage_path,
                callbacks=[_study_callback(self.experiment, self.uri, clock)], verbose=0),
        )
        with _without_restore_hint():
            grid = tuner.fit()
        # The last line of a trial's error is its own exception (Ray prefixes task details).
        summary["errors"] += [last_line(e)[:400] for e in grid.errors]
        # Done means its closing report (per member: `skipped/<i>`, or `failed/<i>` for a
        # cohort's member that diverged) arrived: after a Ctrl-C, Tune hands back the
        # interrupted trials too, without an error (and some without their config).
        ended: set[str] = set()
        for r in (r for r in grid if r.config):
            members = r.config["trial"]["members"]
            if r.error is not None:
                ended |= {member["name"] for member in members}
                continue
            for i, member in enumerate(members):
                metrics = r.metrics or {}
                if metrics.get(f"failed/{i}"):
                    run = tracking.find_trial_run(self.uri, self.experiment, member["key"])
                    summary["errors"].append(
                        f"trial {member['name']} {run.data.tags.get(tracking.FAILURE_TAG)}")
                elif f"skipped/{i}" in metrics:
                    summary["skipped" if metrics[f"skipped/{i}"] else "trained"].append(
                        member["name"])
                else:
                    continue
                ended.add(member["name"])
        # Neither is a trial the scheduler stopped (ASHA), nor one whose run finished as the
        # study was stopped: MLflow tells which of the others are still to train.
        unfinished = pending_search_trials(self.uri, [t for t in trials
                                                      if t.run_name not in ended])
        if unfinished:
            raise self._interrupted(unfinished, len(trials))

    def _interrupted(self, unfinished: list[TrialConfig], total: int) -> Interrupted:
        """Tune returns early only when stopped (Ctrl-C): the unfinished trials' runs, left
        RUNNING by their killed actors, end KILLED so the store tells what is not done."""
        for t in unfinished:
            run = tracking.find_trial_run(self.uri, self.experiment, t.key())
            if run is not None and run.info.status == "RUNNING":
                tracking.end_run(self.uri, run.info.run_id, "KILLED", INTERRUPTED)
        names = [t.run_name for t in unfinished]
        return Interrupted(f"study {self.study.name} interrupted with {len(names)} of {total} "
                           f"trials unfinished ({', '.join(names)}); finished trials are kept: "
                           f"run the same command again to resume", names)


class _RestoreHintFilter(logging.Filter):
    """Drops Tune's advice to call `Tuner.restore` after a Ctrl-C: a study resumes by running
    the same command again (its trials are keyed in MLflow), which our last line says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


@contextlib.contextmanager
def _without_restore_hint():
    logger, hint = logging.getLogger("ray.tune.tune"), _RestoreHintFilter()
    logger.addFilter(hint)
    try:
        yield
    finally:
        logger.removeFilter(hint)


def _reuses_actors(scheduler: Any, param_space: dict[str, Any]) -> bool:
    """Whether the next trial may run in a finished trial's Tune actor, which has imported
    torch, MLflow and the trial code already (about 4 s of CPU a trial). Not under a scheduler
    (ASHA): a stopped trial's thread, blocked in Ray Train's fit(), would keep its workers
    training in the cached actor. Not when the actor fine-tunes (GLUE) or evaluates: on a GPU
    node it would keep its CUDA memory beside the next trial's workers."""
    return scheduler is None and not (param_space["glue"]["tasks"] or param_space["eval"]["tasks"])


def _tune_entry(trials: list[TrialConfig]) -> dict[str, Any]:
    """A trial or a cohort as Tune carries it: the config objects (Tune passes them to the
    trainable through its object store, by reference) beside the plain values callbacks read
    in the driver."""
    first = trials[0]
    name = first.run_name if len(trials) == 1 else f"cohort{len(trials)}-{first.run_name}"
    return {"specs": trials, "name": name, "steps": first.train.steps,
            "members": [{"name": t.run_name, "key": t.key()} for t in trials]}


def _trial_name(trial) -> str:
    """The Tune trial's name (a trial's run name, or its cohort's), for a trial or result."""
    return trial.config["trial"]["name"]
