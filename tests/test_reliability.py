"""Reliability: a worker killed mid-trial, a diverging trial inside a study, and bad input
refused before anything starts, each with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm.config import TrialConfig, load_yaml
from ternarylm.data import DataConfig, WindowSampler, prepare_data
from ternarylm.errors import UserError
from ternarylm.model import SIZES, ModelConfig
from ternarylm.plans import PRESETS
from ternarylm.study import StudyConfig

from test_study import study_yaml
from test_trial import only_run, train_env, trial_config, wait_for_step

REPO = Path(__file__).resolve().parents[1]


def train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            found.append(p)
    return found


@pytest.mark.slow
def test_killed_worker_resumes_in_the_same_run(tmp_path, tinystories, ray_head, mlflow_uri):
    config = trial_config(tmp_path, tinystories, steps=60)
    raw = yaml.safe_load(config.read_text()) | {"max_failures": 2, "num_workers": 1}
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(["ternarylm", "train", "--config", str(config)],
                            env=train_env(ray_head, mlflow_uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(mlflow_uri, 30, proc, timeout=400)  # so the step-20 checkpoint exists
    workers = train_workers()
    assert workers, "no Ray Train worker process found"
    for w in workers:
        w.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["ternarylm.resumed_from_step"]) >= 10
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 61, 5))


@pytest.mark.slow
def test_diverging_trial_fails_and_the_study_goes_on(tmp_path, tinystories, ray_head):
    config = study_yaml(tmp_path / "study.yaml", tinystories, ["nano", "tiny"],
                        ["all_ternary"], name="nan")
    raw = yaml.safe_load(config.read_text())
    raw["per_size"] = {"nano": {"train": {"inject_nan_at_step": 3}}}
    config.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                          str(config), "--json"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 1, out.stderr[-3000:]  # the study finished, with a failed trial
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(summary["errors"]) == 1 and "diverged" in summary["errors"][0]
    assert any("left out of the fits" in w and "nano" in w for w in summary["warnings"])
    client = MlflowClient(uri)
    runs = {r.info.run_name.split("-")[0]: r for r in
            client.search_runs([client.get_experiment_by_name("ternarylm").experiment_id])}
    assert runs["nano"].info.status == "FAILED"
    assert "diverged: loss became nan at step 3" in runs["nano"].data.tags["ternarylm.failure"]
    assert runs["tiny"].info.status == "FINISHED"
    assert runs["study"].info.status == "FINISHED"
    assert summary["fits"]["absmean/all_ternary"]["left_out"] == 1


# ---------------------------------------------------------------- bad input, refused early

TRIAL = {"size": "nano", "data": {"source": "corpus.txt", "tokenizer": "char"}}


def with_(base: dict, **changes) -> dict:
    out = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


BAD_TRIALS = [
    (with_(TRIAL, size="huge"), f"unknown model size 'huge'; sizes: {', '.join(SIZES)}"),
    (with_(TRIAL, scheme="binary"), "unknown scheme 'binary'; choose one of absmean"),
    (with_(TRIAL, plan="half_ternary"), "unknown precision plan 'half_ternary'"),
    (with_(TRIAL, plan={"bits": 3}), r"unknown field\(s\) bits"),
    (with_(TRIAL, plan={"default": "int3"}), "unknown format 'int3' for default"),
    (with_(TRIAL, plan={"blocks": {7: "int8"}}), "block index 7 is out of range for a model "
                                                  "with 4 blocks"),
    (with_(TRIAL, plan={"overrides": {"blocks.*.ffn.*": "int8"}}), "selects no layer"),
    (with_(TRIAL, plan={"activation_bits": 1}), "activation_bits must be between 2 and 16"),
    (with_(TRIAL, plan={"first_k": 3, "last_k": 3}), "exceed the model's 4 blocks"),
    (with_(TRIAL, train__steps=-5), "TrainConfig.steps must be a positive number"),
    (with_(TRIAL, train__micro_batch=0), "TrainConfig.micro_batch must be a positive number"),
    (with_(TRIAL, train__zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (with_(TRIAL, train__schedule="linear"), "schedule must be 'cosine', 'wsd' or 'two_stage'"),
    (with_(TRIAL, train__precision="fp16"), "precision must be auto, bf16 or fp32"),
    (with_(TRIAL, train__warmup_steps=500), r"warmup_steps \(500\) must be >= 0 and below"),
    (with_(TRIAL, train__label_smoothing=1.5), r"label_smoothing must be in \[0, 1\)"),
    (with_(TRIAL, train__stpes=10), r"unknown setting\(s\) in trial.train: stpes"),
    (with_(TRIAL, sise="nano"), r"unknown setting\(s\) in trial: sise"),
    (with_(TRIAL, num_workers=0), "TrialConfig.num_workers must be a positive number"),
    (with_(TRIAL, max_failures=-1), "max_failures must be >= 0"),
    (with_(TRIAL, seq_len=0), "seq_len must be a positive integer"),
    (with_(TRIAL, data__tokenizer="wordpiece"), "tokenizer"),
    (with_(TRIAL, data__val_fraction=1.5), "val_fraction"),
]


@pytest.mark.parametrize("config, message", BAD_TRIALS)
def test_bad_trial_configs_are_refused(config, message):
    with pytest.raises(UserError, match=message):
        TrialConfig.from_dict(config)


@pytest.mark.parametrize("fields, message", [
    ({"width": 100, "n_heads": 3}, "width 100 is not divisible by n_heads 3"),
    ({"width": 90, "n_heads": 18}, "head size 5 must be even for RoPE"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_model_shapes_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"tokens": 0}, "token budget must be positive"),
    ({"tokens": 1000, "tokens_per_param": 20}, "exactly one of tokens"),
    ({"tokens": 1000, "per_size": {"xl": {}}}, "per_size names size.s. not in study.sizes: xl"),
    ({"tokens": 1000, "max_concurrent": 0}, "max_concurrent"),
    ({"tokens": 1000, "warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\)"),
])
def test_bad_study_budgets_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        StudyConfig(sizes=["nano"], **fields)


def test_bad_yaml_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("size: [nano\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_yaml(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- nano\n")
    with pytest.raises(UserError, match="must hold a mapping of settings, got list"):
        load_yaml(tmp_path / "list.yaml")


def test_split_shorter_than_a_sequence_is_refused(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Once upon a time there was a cat.\n\nIt sat.\n")
    data = prepare_data(DataConfig(source=str(corpus), tokenizer="char",
                                   cache_dir=str(tmp_path / "cache")))
    with pytest.raises(UserError, match="shorter than one sequence|tokens"):
        WindowSampler(data.tokens("validation"), 256, 4, 0, 1, 0)


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["ternarylm", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_refused(out: subprocess.CompletedProcess, message: str, uri: str | None) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    if uri:  # nothing half made in MLflow
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ternarylm")
        assert exp is None or not client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("source, message", [
    ("missing.txt", "file not found"),
    ("empty.txt", "file is empty"),
    ("binary.txt", "binary"),
])
def test_unreadable_data_stops_train_before_any_run(tmp_path, mlflow_uri, source, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(with_(TRIAL, data__source=str(tmp_path / source))))
    out = run_cli(["train", "--config", str(config)], {**os.environ})
    assert_refused(out, message, mlflow_uri)


def test_tracking_uri_that_does_not_answer(tmp_path, tinystories):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(with_(TRIAL, data__source=str(tinystories))))
    from conftest import free_port
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    out = run_cli(["train", "--config", str(config)], env)  # run_cli's timeout: no hang
    assert_refused(out, "does not answer", None)


def test_more_workers_than_the_cluster_has(tmp_path, tinystories, ray_head, mlflow_uri):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(with_(TRIAL, data__source=str(tinystories),
                                           num_workers=64)))
    out = run_cli(["train", "--config", str(config)], train_env(ray_head, mlflow_uri))
    assert_refused(out, "needs 64 CPU (64 workers) but the Ray cluster has 2", mlflow_uri)


def test_study_script_refuses_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"sizes": ["nano"], "tokens": 1000, "plans": ["fp8"]}))
    out = subprocess.run([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                          str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "scaling.py: error: unknown precision plan 'fp8'; presets: "
        f"{', '.join(PRESETS)} (or give a mapping of plan fields)"]


def assert_fault_line(out: subprocess.CompletedProcess, message: str, todo: str) -> None:
    """A fault: exit status 1 and one line on stderr with the cause and what to do."""
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-3000:]
    assert todo in lines[0] and "(--verbose shows the traceback)" in lines[0]


def test_ray_that_cannot_start_is_one_line(tmp_path, tinystories, mlflow_uri):
    blocker = tmp_path / "a-file"  # Ray's temp dir under a file: its local node cannot start
    blocker.write_text("")
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(with_(TRIAL, data__source=str(tinystories))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = run_cli(["train", "--config", str(config)], env | {"RAY_TMPDIR": str(blocker)})
    assert_fault_line(out, "could not start a local Ray cluster (", "run the same command again")
    assert MlflowClient(mlflow_uri).get_experiment_by_name("ternarylm") is None


def test_failed_trial_is_one_line(tmp_path, tinystories, ray_head, mlflow_uri):
    config = trial_config(tmp_path, tinystories, steps=6, inject_nan_at_step=2)
    raw = yaml.safe_load(config.read_text()) | {"num_workers": 1, "size": "pico"}
    config.write_text(yaml.safe_dump(raw))
    out = run_cli(["train", "--config", str(config)], train_env(ray_head, mlflow_uri))
    assert_fault_line(out, "diverged: loss became nan at step 2", "lower train.lr")
    assert only_run(mlflow_uri)[1].info.status == "FAILED"


def test_gpu_trial_on_a_cpu_cluster_is_one_line(tmp_path, tinystories, ray_head, mlflow_uri):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(with_(TRIAL, data__source=str(tinystories), use_gpu=True)))
    out = run_cli(["train", "--config", str(config)], train_env(ray_head, mlflow_uri))
    assert_refused(out, "needs 1 GPU (1 workers) but the Ray cluster has 0; set use_gpu: false",
                   mlflow_uri)
