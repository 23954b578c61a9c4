"""Trial identity: a key hashes every setting (defaults included) and the code's numerics
version, and one skip rule decides what is done, on a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses

import pytest

from ternarylm.core import identity

from ternarylm import tracking
from ternarylm.config import TrainConfig, TrialConfig
from ternarylm.training.trial import open_run

YAML = {"size": "pico", "seq_len": 32, "train": {"steps": 10, "warmup_steps": 1}}


def _default_of(cls, name: str, value, monkeypatch) -> None:
    """A release whose default of `cls.name` is `value` (what a dataclass __init__ reads)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    with_defaults = names[len(names) - len(cls.__init__.__defaults__):]
    defaults = list(cls.__init__.__defaults__)
    defaults[with_defaults.index(name)] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))


def _notes(capsys) -> list[str]:
    """Our notice lines on stderr (MLflow logs its store's creation there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def test_a_config_relying_on_a_default_changes_key_when_the_default_changes(monkeypatch):
    before = TrialConfig.from_dict(YAML)
    assert before.train.weight_decay == 0.01  # the YAML relies on the default
    key = before.key()  # as the release before stored it
    _default_of(TrainConfig, "weight_decay", 0.1, monkeypatch)
    after = TrialConfig.from_dict(YAML)
    assert after.train.weight_decay == 0.1
    assert after.key() != key
    # Settings the YAML gives itself keep their key: only what trains differently moves.
    pinned = {**YAML, "train": {**YAML["train"], "weight_decay": 0.01}}
    assert TrialConfig.from_dict(pinned).key() == key


def test_a_bumped_numerics_version_changes_every_key(monkeypatch):
    keys = {TrialConfig.from_dict({**YAML, "seed": s}).key() for s in range(3)}
    monkeypatch.setitem(identity.NUMERICS_VERSIONS, "trial",
                        identity.NUMERICS_VERSIONS["trial"] + 1)
    bumped = {TrialConfig.from_dict({**YAML, "seed": s}).key() for s in range(3)}
    assert len(bumped) == 3 and not keys & bumped


def test_a_finished_trial_is_reused_and_retrains_after_a_numerics_bump(mlflow_uri, monkeypatch,
                                                                     capsys):
    cfg = TrialConfig.from_dict(YAML)
    run_id, finished = open_run(cfg, mlflow_uri, None)
    assert finished is None
    tracking.end_run(mlflow_uri, run_id, "FINISHED")
    again, finished = open_run(cfg, mlflow_uri, None)
    assert again == run_id and finished is not None  # the skip: nothing trains
    assert _notes(capsys) == []  # a current store gets no notice

    monkeypatch.setitem(identity.NUMERICS_VERSIONS, "trial",
                        identity.NUMERICS_VERSIONS["trial"] + 1)
    new_id, finished = open_run(cfg, mlflow_uri, None)
    assert finished is None and new_id != run_id  # trains again, under a new run
    err = _notes(capsys)
    assert len(err) == 1 and "1 trial run(s) keyed before trial numerics version" in err[0]
    open_run(cfg, mlflow_uri, None)  # the notice is given once per experiment and version
    assert _notes(capsys) == []


def test_a_store_from_before_versioned_keys_gets_one_line(mlflow_uri, capsys):
    exp = tracking.ensure_experiment("ternarylm", mlflow_uri)
    for i in range(2):  # runs as the code before versioned keys wrote them: no version tag
        old = tracking.start_run(mlflow_uri, exp, f"old-{i}",
                                 {tracking.TRIAL_KEY_TAG: f"{i:016x}"})
        tracking.end_run(mlflow_uri, old, "FINISHED")
    run_id, finished = open_run(TrialConfig.from_dict(YAML), mlflow_uri, None)
    assert finished is None
    err = _notes(capsys)
    assert len(err) == 1 and "holds 2 trial run(s)" in err[0] and "train again" in err[0]
    tags = tracking.client(mlflow_uri).get_run(run_id).data.tags
    assert tags[tracking.NUMERICS_VERSION_TAG] == str(identity.NUMERICS_VERSIONS["trial"])


@pytest.mark.parametrize("status", ["RUNNING", "FAILED", "KILLED"])
def test_only_a_finished_run_under_its_parent_is_done(mlflow_uri, status):
    exp = tracking.ensure_experiment("skip", mlflow_uri)
    parent = tracking.start_run(mlflow_uri, exp, "parent", {})
    other = tracking.start_run(mlflow_uri, exp, "other", {})
    tag = "ternarylm.glue.key"
    child = tracking.start_run(mlflow_uri, exp, "child", {tag: "k"}, parent_run_id=parent)
    if status != "RUNNING":
        tracking.end_run(mlflow_uri, child, status)
    assert tracking.finished_run(mlflow_uri, exp, tag, "k", parent) is None
    tracking.end_run(mlflow_uri, child, "FINISHED")
    assert tracking.finished_run(mlflow_uri, exp, tag, "k", parent).info.run_id == child
    assert tracking.finished_run(mlflow_uri, exp, tag, "k", other) is None
    assert tracking.finished_run(mlflow_uri, exp, tag, "other-key", parent) is None
