"""Studies on Ray Tune: submitted as a Ray job to a loopback head, rerun with an added size,
and the dry run's trial table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm import tracking
from ternarylm.data import DataConfig, prepare_data
from ternarylm.core.errors import UserError
from ternarylm.training.logged_model import find_model
from ternarylm.orchestration.study import StudyConfig, _reuses_actors, trial_table

REPO = Path(__file__).resolve().parents[1]
SCALING = REPO / "studies" / "scaling.py"


def study_yaml(path: Path, corpus: Path, sizes: list[str], plans: list[str],
               name: str = "test", **extra) -> Path:
    config = extra | {
        "name": name, "sizes": sizes, "schemes": ["absmean"], "plans": plans, "seeds": [0],
        "tokens": 6144, "evals_per_trial": 2, "max_concurrent": 2,
        "trial": {"seq_len": 64, "num_workers": 1, "max_failures": 0,
                  "data": {"source": str(corpus), "tokenizer": "char"},
                  "train": {"micro_batch": 8, "lr": 3e-3, "eval_max_tokens": 2048,
                            "train_sample_tokens": 2048}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def submit_job(args: list[str], env: dict, wait: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (a fresh head
    answers `ray status` a few seconds before it takes jobs)."""
    deadline = time.time() + wait
    while True:
        out = subprocess.run(["ray", "job", "submit", *args], capture_output=True, text=True,
                             env=env, timeout=900)
        if "No available agent" not in out.stderr or time.time() > deadline:
            return out
        time.sleep(3)


def runs_by_name(uri: str) -> dict:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ternarylm")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_study_submitted_as_ray_job(tmp_path, tinystories, ray_head):
    config = study_yaml(tmp_path / "study.yaml", tinystories,
                        ["nano", "tiny", "micro", "mini"], ["all_ternary"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri,
                                "TERNARYLM_HOME": str(tmp_path / "home")}}
    out = submit_job(["--address", ray_head["RAY_DASHBOARD"], "--working-dir", str(REPO),
                      "--runtime-env-json", json.dumps(runtime_env), "--", "python",
                      "studies/scaling.py", "--config", str(config), "--json"],
                     {**os.environ, **ray_head})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    assert summary["errors"] == []

    runs = runs_by_name(uri)
    parent = runs.pop("study-test")
    assert len(runs) == 4
    # One console line per evaluation: the last one is not repeated by the trial's closing report.
    for name, run in runs.items():
        steps = int(run.data.params["train.steps"])
        assert out.stdout.count(f"{name}: step {steps}/{steps} ") == 1, out.stdout[-3000:]
    client = MlflowClient(uri)
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for metric in ("final/val/loss", "final/val/bpb", "final/train_val_ratio",
                       "final/sparsity/ternary", "final/memory/packed_bytes"):
            assert metric in run.data.metrics, (run.info.run_name, metric)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.csv", "results/results.md", "results/fits.json",
            "results/loss_vs_size.png", "results/sparsity_heatmap.png",
            "results/memory_vs_size.png", "results/train_val_ratio_vs_size.png"} <= artifacts
    fit = summary["fits"]["absmean/all_ternary"]
    assert fit["points"] == 4 and {"E", "A", "alpha", "ci"} <= set(fit["fit"])
    assert parent.data.metrics["study/trials_finished"] == 4
    # Summary metrics on the parent, comparable across studies in the MLflow UI.
    for size in ("nano", "tiny", "micro", "mini"):
        best = parent.data.metrics[f"best/val/bpb/{size}/all_ternary"]
        trial = next(r for r in runs.values() if r.info.run_name.startswith(f"{size}-"))
        assert best == pytest.approx(trial.data.metrics["final/val/bpb"])
    assert parent.data.metrics["fit/absmean/all_ternary/alpha"] == pytest.approx(
        fit["fit"]["alpha"])
    # The dry run's FLOPs are the ones each trial logged.
    planned = {r["key"]: r["flops"] for r in trial_table(StudyConfig.from_yaml(config))}
    for run in runs.values():
        assert run.data.metrics["final/progress/flops"] == planned[
            run.data.tags["ternarylm.trial_key"]]


def eval_runs(uri: str, trial_run_id: str) -> list:
    """The lm-eval child runs of one trial."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ternarylm")
    return client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{trial_run_id}' and "
                              f"tags.`ternarylm.eval.tasks` = 'stories_ppl'")


@pytest.mark.slow
def test_rerun_trains_only_new_cells(tmp_path, tinystories, ray_head, mlflow_server):
    """A rerun trains only the added cell; every finished trial gets its lm-eval child run
    (the study's eval option), once: the rerun does not evaluate the reused trial again. On a
    real `mlflow server` (REST API): each trial's dataset inputs, its logged model that loads
    and generates, and the study's registration, idempotent."""
    from conftest import write_tasks

    uri = mlflow_server
    env = {**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, tinystories.read_text(encoding="utf-8"))
    evals = {"eval_tasks": ["stories_ppl"], "eval": {"include_path": str(tasks), "limit": 4}}
    config = study_yaml(tmp_path / "study.yaml", tinystories, ["nano"], ["all_ternary"], **evals)

    def run_study() -> dict:
        out = subprocess.run([sys.executable, str(SCALING), "--config", str(config), "--json"],
                             capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cells(names: list[str]) -> list[str]:
        return [n.rsplit("-s", 1)[0] for n in names]  # drop the seed and key suffix

    first = run_study()
    assert cells(first["trained"]) == ["nano-absmean-all_ternary"] and first["skipped"] == []
    nano = runs_by_name(uri)
    study_yaml(config, tinystories, ["nano", "tiny"], ["all_ternary"], **evals)
    second = run_study()
    assert cells(second["trained"]) == ["tiny-absmean-all_ternary"]
    assert cells(second["skipped"]) == ["nano-absmean-all_ternary"]
    runs = {n: r for n, r in runs_by_name(uri).items() if "-eval-" not in n}
    assert len(runs) == 3  # parent + 2 trials: the nano run was reused, not repeated
    old = next(r for n, r in nano.items() if n.startswith("nano") and "-eval-" not in n)
    again = runs[old.info.run_name]
    assert again.info.run_id == old.info.run_id and again.info.end_time == old.info.end_time
    digest = prepare_data(DataConfig(source=str(tinystories), tokenizer="char")).digest
    # The parent lists the study's data once, though it ran twice (its Dataset column).
    assert sorted((d.dataset.name.rsplit("/", 1)[1], d.dataset.digest)
                  for d in runs["study-test"].inputs.dataset_inputs) == [
        ("train", digest), ("validation", digest)]
    for run in (r for n, r in runs.items() if not n.startswith("study-")):
        # The study's view of the trial's time: its wall time holds the loop and the rest.
        m = run.data.metrics
        assert m["final/time/trial_wall_s"] == pytest.approx(
            m["final/time/train_loop_s"] + m["final/time/outside_training_s"])
        assert m["final/time/outside_training_s"] > m["final/time/worker_start_s"] > 0
        (child,) = eval_runs(uri, run.info.run_id)
        assert child.info.status == "FINISHED"
        assert child.data.metrics["eval/stories_ppl/bits_per_byte"] > 0, child.data.metrics
        # Its data (the token cache, one digest for both splits: the trials share it), its
        # model, loaded through the server and generating.
        inputs = {d.dataset.name.rsplit("/", 1)[1]: d for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["train", "validation"], run.inputs
        assert {d.dataset.digest for d in inputs.values()} == {digest}
        assert {t.key: t.value for t in inputs["train"].tags}["mlflow.data.context"] == "train"
        model = find_model(uri, run.info.run_id)
        with tracking.global_uri(uri):
            text = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(
                ["Once upon a time"], params={"max_new_tokens": 8, "seed": 0})
        assert len(text) == 1 and text[0].startswith("Once upon a time") and len(text[0]) > 16
    # Registration: one version per cell, and a rerun registers nothing again.
    from ternarylm.orchestration.registry import register_study
    name = yaml.safe_load(config.read_text())["name"]
    first_reg = register_study(name, uri=uri)
    assert sorted(v["new"] for v in first_reg["versions"]) == [True, True]
    again_reg = register_study(name, uri=uri)
    assert [v["new"] for v in again_reg["versions"]] == [False, False]
    assert ({v["version"] for v in again_reg["versions"]}
            == {v["version"] for v in first_reg["versions"]})
    bad = subprocess.run(["ternarylm", "register", "no-such-study"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_dry_run_json_lists_every_trial():
    out = subprocess.run([sys.executable, str(SCALING), "--preset", "ladder", "--dry-run",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    trials = json.loads(out.stdout.strip().splitlines()[-1])
    study = StudyConfig.from_yaml(REPO / "studies" / "configs" / "ladder.yaml")
    # 6 sizes x (2 schemes x 3 ternary plans + 1 fp plan) x 1 seed
    assert len(trials) == 6 * (2 * 3 + 1) == len(study.trials())
    for t in trials:
        assert {"size", "scheme", "plan", "seed", "params", "tokens", "flops"} <= set(t)
        # tokens_per_param: 20 -> at least 20 tokens per non-embedding parameter
        assert t["tokens"] >= 20 * t["params"]
    xxl = next(t for t in trials if t["size"] == "xxl")
    assert xxl["params"] > 1e9


def test_local_preset_is_the_default_and_has_the_required_grid(tinystories):
    out = subprocess.run([sys.executable, str(SCALING), "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TERNARYLM_SHARED_DATA": str(tinystories.parents[1])})
    assert out.returncode == 0, out.stderr
    trials = json.loads(out.stdout.strip().splitlines()[-1])
    assert len({t["size"] for t in trials}) >= 3
    assert len({t["scheme"] for t in trials if t["plan"] != "fp"}) >= 2
    assert {"fp", "all_ternary"} <= {t["plan"] for t in trials}


def test_fp_plan_trains_once_per_size(tinystories, tmp_path):
    study = StudyConfig(sizes=["nano"], schemes=["absmean", "twn", "learned"],
                        plans=["fp", "all_ternary"], tokens=10000,
                        trial={"data": {"source": str(tinystories), "tokenizer": "char"}})
    rows = trial_table(study)
    assert [(r["scheme"], r["plan"]) for r in rows].count(("absmean", "fp")) == 1
    assert len(rows) == 1 + 3
    assert len({r["key"] for r in rows}) == len(rows)


@pytest.mark.parametrize("change, message", [
    ({"sizes": ["huge"]}, "unknown model size 'huge'"),
    ({"schemes": ["binary"]}, "unknown scheme 'binary'"),
    ({"plans": ["half_ternary"]}, "unknown precision plan 'half_ternary'"),
    ({"tokens": -5}, "token budget must be positive"),
    ({"tokens": None}, "exactly one of tokens"),
    ({"tokens_per_param": 20}, "exactly one of tokens"),
    ({"sizes": []}, "study.sizes must be a non-empty list"),
    ({"scheduler": "pbt"}, "study.scheduler must be fifo or asha"),
    ({"trial": {"train": {"steps": 10}}}, "set by the study from its token budget"),
])
def test_bad_study_configs_are_refused(change, message):
    base = {"sizes": ["nano"], "tokens": 1000}
    with pytest.raises(UserError, match=message):
        StudyConfig(**{**base, **change})


@pytest.mark.parametrize("scheduler, glue, evals, reused", [
    (None, [], [], True), ("asha", [], [], False), (None, ["mrpc"], [], False),
    (None, [], ["hellaswag"], False)])
def test_tune_actors_are_reused_only_when_the_driver_trains_nothing_itself(scheduler, glue,
                                                                            evals, reused):
    """A stopped (ASHA) trial's thread would keep training in a cached actor, and a GLUE or
    evaluation actor would keep its GPU memory: only plain trials reuse Tune's actors."""
    space = {"glue": {"tasks": glue}, "eval": {"tasks": evals}}
    assert _reuses_actors(scheduler, space) is reused
