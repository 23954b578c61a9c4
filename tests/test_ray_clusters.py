"""The Ray clusters around a trial: the suite stops only its own, a dead cluster's record is not
waited on, and a driver whose cluster goes away ends in one line and resumes on a new one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import start_ray_head, stop_ray_head
from ternarylm.training.cluster import free_port, session_processes
from test_trial import only_run, trial_config, wait_for_step

pytestmark = pytest.mark.slow


@pytest.fixture
def short_tmp():
    """A short folder: Ray's unix sockets under it must fit the 107-byte path limit."""
    path = Path(tempfile.mkdtemp(prefix="tlm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _answers(address: str, env: dict) -> bool:
    status = subprocess.run(["ray", "status", "--address", address], env=env,
                            capture_output=True, timeout=120)
    return status.returncode == 0


def test_suite_cluster_leaves_a_users_cluster_running(short_tmp):
    """A cluster started the way a user does (`ray start --head`, daemonised) survives the
    suite's own cluster being started and stopped beside it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port = free_port()
    user = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={short_tmp / 'user'}",
         "--disable-usage-stats"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    user.wait(timeout=240)
    user_address = f"127.0.0.1:{port}"
    try:
        assert _answers(user_address, env)
        user_pids = {p.pid for p in session_processes(user.pid)}
        suite, _ = start_ray_head(short_tmp / "suite", env)
        suite_pids = {p.pid for p in session_processes(suite.pid)}
        assert suite_pids and not suite_pids & user_pids
        stop_ray_head(suite)
        assert not session_processes(suite.pid)  # the suite's cluster is gone...
        assert _answers(user_address, env)  # ...and the user's still answers
        assert {p.pid for p in session_processes(user.pid)} >= user_pids
    finally:
        stop_ray_head(user)


def _write_dead_record(ray_tmp: Path) -> str:
    """What a cluster from `ray start` that died without being stopped leaves: its address."""
    address = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(address)
    return address


def test_dead_record_starts_a_local_cluster(short_tmp, tinystories, mlflow_uri, tmp_path):
    dead = _write_dead_record(short_tmp)
    config = trial_config(tmp_path, tinystories, steps=10, eval_every=10, checkpoint_every=10)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(short_tmp), "MLFLOW_TRACKING_URI": mlflow_uri}
    out = subprocess.run(["ternarylm", "train", "--config", str(config)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    port = dead.rpartition(":")[2]  # Ray resolves 127.0.0.1 to this machine's address
    assert re.search(rf"last started on this machine \([0-9.]+:{port}\) no longer answers; "
                     rf"starting a local cluster instead", out.stderr), out.stderr[-2000:]
    assert only_run(mlflow_uri)[1].info.status == "FINISHED"


def test_explicit_address_with_nothing_there_is_one_line(tinystories, mlflow_uri, tmp_path):
    config = trial_config(tmp_path, tinystories)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": mlflow_uri}
    # The timeout is the hang guard (15 s on a quiet machine, imports included).
    out = subprocess.run(["ternarylm", "train", "--config", str(config)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"ternarylm train: error: RAY_ADDRESS={address}: no Ray cluster answers there; start "
        f"it (ray start --head) or unset RAY_ADDRESS to run on a local cluster"]
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ternarylm")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_driver_ends_when_its_cluster_goes_and_resumes_on_a_new_one(
        short_tmp, tinystories, mlflow_uri, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": mlflow_uri}
    cluster, client_env = start_ray_head(short_tmp / "a", env)
    config = trial_config(tmp_path, tinystories, steps=60, log_every=5)
    driver = subprocess.Popen(["ternarylm", "train", "--config", str(config)],
                              env={**env, **client_env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Two checkpoints written (10, 20): Ray Train registers one a moment after writing it.
        wait_for_step(mlflow_uri, 30, driver, timeout=400)
        stop_ray_head(cluster, signal.SIGKILL)  # the cluster vanishes (node lost, OOM kill)
        _, stderr = driver.communicate(timeout=120)  # it ends by itself, or this raises
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop_ray_head(cluster, signal.SIGKILL)
    assert driver.returncode != 0
    assert "stopped answering" in stderr.strip().splitlines()[-1], stderr[-3000:]
    _, run = only_run(mlflow_uri)
    assert run.info.status == "FAILED"
    assert "stopped answering" in run.data.tags["ternarylm.failure"]

    cluster, client_env = start_ray_head(short_tmp / "b", env)
    try:
        out = subprocess.run(["ternarylm", "train", "--config", str(config)],
                             env={**env, **client_env}, capture_output=True, text=True,
                             timeout=600)
    finally:
        stop_ray_head(cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    client, run = only_run(mlflow_uri)  # the same run, resumed
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["ternarylm.resumed_from_step"]) >= 10
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 61, 5))
