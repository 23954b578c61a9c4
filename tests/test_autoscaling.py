"""Autoscaling and node loss on one machine (issue 19).

`benchmarks/local_autoscaling.py` starts a head with the real Ray autoscaler and its fake
multi-node provider, the node types taken from cluster/aws.yaml (scaled down), and runs a small
study on it: nodes are added while trials wait and removed once idle. With `--reclaim`, the node
that runs a rank of a 2-worker trial vanishes mid-training; the trial must resume from its last
checkpoint on a new node, in the same MLflow run, with no missing or repeated step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm.training.cluster import session_processes, stop_session

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "local_autoscaling.py"
# Loaded by path: benchmarks/ is a folder of scripts, not a package.
_spec = importlib.util.spec_from_file_location("local_autoscaling", SCRIPT)
local_autoscaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_autoscaling)

LAUNCHER = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())


def test_local_node_types_follow_aws_yaml():
    config = local_autoscaling.fake_cluster_config(LAUNCHER, "127.0.0.1:1")
    from ray.autoscaler._private.util import validate_config

    validate_config(config)  # what the autoscaler checks before it runs it
    types = config["available_node_types"]
    aws_head = LAUNCHER["available_node_types"][LAUNCHER["head_node_type"]]
    assert types[local_autoscaling.FAKE_HEAD_TYPE]["resources"] == aws_head["resources"]
    assert aws_head["resources"]["CPU"] == 0 and aws_head["resources"]["trial_driver"] > 0
    workers = {k: v for k, v in types.items() if k != local_autoscaling.FAKE_HEAD_TYPE}
    aws_workers = {k: v for k, v in LAUNCHER["available_node_types"].items()
                   if k != LAUNCHER["head_node_type"]}
    assert sorted(workers) == sorted(aws_workers)
    for name, spec in workers.items():
        assert spec["min_workers"] == aws_workers[name]["min_workers"] == 0
        assert spec["resources"]["CPU"] == 1 and "GPU" not in spec["resources"]
    env = local_autoscaling.node_env(LAUNCHER)
    assert env["TERNARYLM_AUTOSCALING"] == "1" and env["RAY_AUTH_MODE"] == "token"
    assert not any(k.startswith("AWS_") or "YOUR-" in v for k, v in env.items())
    # A change to aws.yaml reaches the local cluster.
    changed = json.loads(json.dumps(LAUNCHER))
    changed["available_node_types"]["gpu_worker"]["min_workers"] = 1
    changed["available_node_types"][LAUNCHER["head_node_type"]]["resources"]["CPU"] = 2
    types = local_autoscaling.fake_cluster_config(changed, "x:1")["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 1
    assert types[local_autoscaling.FAKE_HEAD_TYPE]["resources"]["CPU"] == 2


def run_script(workdir: Path, corpus: Path, *args: str, timeout: float = 420) -> dict:
    """The script's JSON line; whatever happens, its cluster is gone afterwards (by the ids of
    its session's processes)."""
    try:
        out = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(workdir), "--data",
                              str(corpus), "--json", *args], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ})
        print(out.stdout[-6000:])
        assert out.stdout.strip(), out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
        return result
    finally:
        pid = workdir / "head.pid"
        if pid.is_file():
            assert stop_session(int(pid.read_text())) == 0


def worker_counts(events: list[dict]) -> list[int]:
    return [e["worker_nodes"] for e in events]


@pytest.mark.slow
def test_study_on_an_autoscaling_cluster(tmp_path, tinystories):
    result = run_script(tmp_path, tinystories)
    assert result["study_rc"] == 0 and result["processes_left"] == 0
    assert not session_processes(result["head_session"])
    summary = result["study"]
    assert len(summary["trained"]) == 2 and not summary["errors"]
    # The trials queued: the study said what it waited for, with no CPU free at first.
    assert any("waiting for the autoscaler: " in line and "1 x 1 CPU" in line
               and "the cluster has 0 CPU free" in line for line in result["waiting_lines"])
    events = result["events"]
    ups = [e for e in events if e["event"] == "up"]
    downs = [e for e in events if e["event"] == "down"]
    # Nodes were added for the two 1-CPU trials, and each was removed once idle.
    assert len(ups) >= 2 and max(worker_counts(events)) >= 2
    up_at = {e["node"]: e["t"] for e in ups}
    assert sorted(e["node"] for e in downs) == sorted(up_at)
    assert all(e["t"] > up_at[e["node"]] for e in downs)
    assert events[-1]["worker_nodes"] == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ternarylm").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3  # 2 trials + the study
    print("autoscaler events:", json.dumps(events))
    print("wall seconds:", result["seconds"])


@pytest.mark.slow
def test_trial_resumes_after_losing_a_node(tmp_path, tinystories):
    result = run_script(tmp_path, tinystories, "--reclaim", "--reclaim-after-step", "60")
    assert result["study_rc"] == 0 and result["processes_left"] == 0
    assert not session_processes(result["head_session"])
    lost = result["reclaimed"]
    assert lost and lost["after_step"] >= 60 and lost["processes"] >= 2
    events = result["events"]
    gone = [e for e in events if e["event"] == "down" and e["node"] == lost["node"]]
    assert gone and gone[0]["t"] >= lost["t"]
    before = {e["node"] for e in events if e["t"] <= lost["t"]}
    # The autoscaler replaced the lost node with a new one.
    assert any(e["event"] == "up" and e["node"] not in before for e in events)
    assert events[-1]["worker_nodes"] == 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name.split("-")[0]: r for r in client.search_runs(
        [client.get_experiment_by_name("ternarylm").experiment_id])}
    assert sorted(runs) == ["nano", "study"]  # one trial run: the same one continued
    run = runs["nano"]
    assert run.info.status == "FINISHED" and runs["study"].info.status == "FINISHED"
    # From a checkpoint at least as new as the result the study had printed (Ray Train had
    # registered that checkpoint), not from scratch.
    resumed = int(run.data.tags["ternarylm.resumed_from_step"])
    every = int(run.data.params["train.checkpoint_every"])
    total = int(run.data.params["train.steps"])
    assert lost["after_step"] <= resumed < total and resumed % every == 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    log_every = int(run.data.params["train.log_every"])
    assert steps == list(range(log_every, total + 1, log_every))  # no gap, no duplicate
    print("reclaimed:", json.dumps(lost), "autoscaler events:", json.dumps(events))
    print("wall seconds:", result["seconds"])


def test_wait_line_says_what_trials_wait_for():
    from ternarylm.training.cluster import describe_wait

    free = {"CPU": 0.0, "trial_driver": 999.98}
    assert describe_wait([[{"CPU": 1.0}], [{"CPU": 1.0}]], free) == (
        "waiting for the autoscaler: 2 worker groups need 1 x 1 CPU each; the cluster has "
        "0 CPU free")
    assert describe_wait([[{"CPU": 8.0, "GPU": 1.0}] * 2], {"CPU": 3.0}) == (
        "waiting for the autoscaler: 1 worker group needs 2 x 8 CPU + 1 GPU; the cluster has "
        "3 CPU, 0 GPU free")
