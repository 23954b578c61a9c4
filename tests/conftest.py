"""Shared fixtures: the real data beside the repo, an isolated home, and one Ray head per run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ternarylm.training.cluster import free_port, stop_session

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_sample.txt"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on a Ray head is slow, marked or not: `make test-fast` (-m "not slow") is the
    unit tier, `make test` (CI) runs both."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


def start_ray_head(temp: Path, env: dict, *, num_cpus: int = 2,
                   resources: str = '{"trial_driver": 1000}', timeout: float = 240
                   ) -> tuple[subprocess.Popen, dict]:
    """A `ray start --head --block` on loopback with its own ports and temp dir, in a new
    process session: every process of this cluster, and no other, carries that session id.

    Returns the blocking process and the environment a client needs: RAY_ADDRESS for drivers,
    the dashboard URL for `ray job submit`, and RAY_AUTH_MODE=token.
    """
    port, dashboard = free_port(), free_port()
    temp.mkdir(parents=True, exist_ok=True)
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
         f"--resources={resources}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client_env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
                  "RAY_DASHBOARD": f"http://127.0.0.1:{dashboard}"}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {(temp / 'ray-start.log').read_text()[-2000:]}")
        status = subprocess.run(["ray", "status", "--address", client_env["RAY_ADDRESS"]],
                                env={**env, **client_env}, capture_output=True, timeout=120)
        if status.returncode == 0:
            return proc, client_env
        time.sleep(2)
    stop_ray_head(proc)
    raise RuntimeError(f"ray head did not come up in {timeout} s")


def stop_ray_head(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End the cluster of `start_ray_head`, and only it: its session's processes, by id."""
    stop_session(proc.pid, grace=10, sig=sig)  # then SIGKILL: what ignores SIGTERM holds nothing
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One real Ray head on loopback with token authentication, shared by the run, stopped by
    its own process ids: a user's cluster on the same machine is left alone."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                   env=env, check=True, capture_output=True)
    proc, client_env = start_ray_head(tmp_path_factory.mktemp("ray"), env)
    try:
        yield client_env
    finally:
        stop_ray_head(proc)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread: on 2 shared cores a second only adds stalls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """A real `mlflow server` (REST API, proxied artifacts) over a SQLite store in tmp_path:
    its URL, the tracking URI a client uses. Started by benchmarks/mlflow_ui_screenshot.py's
    helper, loaded by path (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mlflow_ui_screenshot", REPO / "benchmarks" / "mlflow_ui_screenshot.py")
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    with screenshot.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}",
                                  str(tmp_path / "server-artifacts")) as base:
        yield base


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_tasks(directory, corpus: str) -> None:
    """Three offline tasks on local jsonl files: multiple choice, perplexity and generation."""
    sentences = [s for s in re.split(r"(?<=\.) ", corpus[90_000:110_000]) if 40 < len(s) < 160]
    sentences = sentences[:12]
    with open(directory / "mc.jsonl", "w") as f:
        for i, s in enumerate(sentences):
            words, other = s.split(), sentences[(i + 5) % len(sentences)].split()
            half = len(words) // 2
            f.write(json.dumps({"context": " ".join(words[:half]),
                                "choices": [" " + " ".join(words[half:]),
                                            " " + " ".join(other[len(other) // 2:])],
                                "label": 0}) + "\n")
    with open(directory / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in sentences)
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        f"task: stories_mc\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "ppl.yaml").write_text(
        f"task: stories_ppl\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'text.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (directory / "gen.yaml").write_text(
        f"task: stories_gen\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'mc.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
