"""`ternarylm register` on a real SQLite store, without training: a study's parent run and its
trial runs as the study leaves them (tags, final metrics, a READY logged model per trial).
`test_study.test_rerun_trains_only_new_cells` registers a study that really trained, over
`mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess

from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ternarylm.core import metrics as M
from ternarylm import tracking
from ternarylm.orchestration.registry import register_study
from ternarylm.orchestration.study import STUDY_TAG


def make_study(uri: str, study: str, status: str = "FINISHED") -> str:
    """A study with one trial per plan; returns the experiment id."""
    c = MlflowClient(uri)
    exp = tracking.ensure_experiment("ternarylm", uri)
    parent = c.create_run(exp, run_name=f"study-{study}", tags={STUDY_TAG: study}).info.run_id
    for i, plan in enumerate(("all_ternary", "mixed")):
        tags = {tracking.PARENT_TAG: parent, tracking.TRIAL_KEY_TAG: f"key{i}",
                "ternarylm.size": "nano", "ternarylm.scheme": "absmean", "ternarylm.plan": plan}
        run = c.create_run(exp, run_name=f"nano-{plan}", tags=tags).info.run_id
        c.log_param(run, "seed", 0)
        c.log_metric(run, M.final(M.VAL_BPB), 2.5 - i / 10)
        c.log_metric(run, M.final(M.PACKED_BYTES), 1000 + 500 * i)
        model = c.create_logged_model(exp, name=f"nano-{plan}", source_run_id=run)
        c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        c.set_terminated(run, status)
    c.set_terminated(parent, "FINISHED")
    return exp


def test_register_is_idempotent_and_under_the_clients_uri(tmp_path, monkeypatch):
    """Versions are created through the given URI alone (MLflow's global tracking URI points
    elsewhere, as in any process that did not set it), once per cell."""
    monkeypatch.chdir(tmp_path)  # MLflow's default store, were it used, lands here
    uri = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(uri, "s1")
    first = register_study("s1", uri=uri)
    assert first["registered_model"] == "ternarylm-s1"
    assert sorted(v["cell"] for v in first["versions"]) == [
        "nano/absmean/all_ternary", "nano/absmean/mixed"]
    assert all(v["new"] for v in first["versions"])
    again = register_study("s1", uri=uri)
    assert [v["new"] for v in again["versions"]] == [False, False]
    assert ([v["version"] for v in again["versions"]]
            == [v["version"] for v in first["versions"]])
    c = MlflowClient(uri)
    assert len(c.search_model_versions("name = 'ternarylm-s1'")) == 2
    mixed = next(e for e in first["versions"] if e["cell"] == "nano/absmean/mixed")
    version = c.get_model_version("ternarylm-s1", str(mixed["version"]))
    assert (version.run_id, version.source) == (mixed["run_id"], f"models:/{mixed['model_id']}")
    # The logged model lists its version once (the Models tab's registered-versions column).
    linked = json.loads(c.get_logged_model(mixed["model_id"]).tags[MLFLOW_MODEL_VERSIONS])
    assert linked == [{"name": "ternarylm-s1", "version": str(mixed["version"])}]
    assert float(version.tags[M.final(M.VAL_BPB)]) == 2.4


def test_register_bad_study_one_line_nothing_registered(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_study(uri, "unfinished", status="FAILED")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for study, says in (("no-such-study", "no study 'no-such-study'"),
                        ("unfinished", "has no finished trials")):
        out = subprocess.run(["ternarylm", "register", study], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr
    assert MlflowClient(uri).search_registered_models() == []
