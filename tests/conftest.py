"""Shared fixtures: the real data beside the repo, an isolated home, and one Ray head per run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_sample.txt"


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory) -> Path:
    """Runs, caches and MLflow stores of the tests stay out of the user's ~/.ternarylm."""
    home = tmp_path_factory.mktemp("ternarylm_home")
    os.environ["TERNARYLM_HOME"] = str(home)
    os.environ["TERNARYLM_CACHE"] = str(home / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("TERNARYLM_STORAGE_PATH", None)
    return home


@pytest.fixture(scope="session")
def tinystories() -> Path:
    if not TINYSTORIES.is_file():
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES}; set TERNARYLM_SHARED_DATA")
    return TINYSTORIES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real `ray start --head` on loopback with token authentication, shared by the run.

    Yields the environment a client needs: RAY_ADDRESS for drivers, the dashboard URL for
    `ray job submit`, and RAY_AUTH_MODE=token.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                   env=env, check=True, capture_output=True)
    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp}", "--disable-usage-stats",
                    '--resources={"trial_driver": 1000}'],
                   env=env, check=True, capture_output=True, timeout=180)
    client_env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
                  "RAY_DASHBOARD": f"http://127.0.0.1:{dashboard}"}
    try:
        yield client_env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread: on 2 shared cores a second only adds stalls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
