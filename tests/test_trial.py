"""Trials for real: DeepSpeed engines in Ray Train workers on a `ray start --head` cluster,
launched through `ternarylm train`, read back from MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm.core import metrics as M
from ternarylm.config import TrialConfig
from ternarylm.orchestration.study import trial_vocab
from ternarylm.training.train import ZERO_STAGE_TAG, deepspeed_config, zero_stage

pytestmark = pytest.mark.slow

# Every metric a CPU trial of a learned-scale ternary model logs (not MFU or CUDA memory).
TRIAL_METRICS = ({m for m in M.METRICS if "{" not in m} - {M.MFU, M.PEAK_CUDA}
                 | {M.block_sparsity(0), M.block_sparsity(3)})
TRIAL_METRICS |= {M.final(m) for m in M.summary_names()} - {M.final(M.MFU),
                                                           M.final(M.PEAK_CUDA)}
TRIAL_METRICS -= {M.STUDY_TRIALS, M.STUDY_FINISHED, M.STUDY_FAILED, M.STUDY_STOPPED,
                  M.TRIAL_WALL_S, M.final(M.TRIAL_WALL_S),  # these two: a study's trials
                  M.EVAL_SECONDS}  # an lm-eval child run's


def trial_config(tmp_path: Path, corpus: Path, **train) -> Path:
    config = {
        "size": "nano", "scheme": "learned", "plan": "all_ternary", "seq_len": 64,
        "num_workers": 2, "max_failures": 0,
        "data": {"source": str(corpus), "tokenizer": "char"},
        "train": {"steps": 30, "micro_batch": 8, "warmup_steps": 3, "lr": 3e-3,
                  "zero_stage": 1, "eval_every": 10, "checkpoint_every": 10, "log_every": 5,
                  "eval_max_tokens": 4096, "train_sample_tokens": 4096, **train},
        "storage_path": str(tmp_path / "runs"),
    }
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_env(ray_head: dict, mlflow_uri: str) -> dict:
    return {**os.environ, **ray_head, "MLFLOW_TRACKING_URI": mlflow_uri}


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ternarylm").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_two_worker_trial_logs_every_metric(tmp_path, tinystories, ray_head, mlflow_uri):
    config = trial_config(tmp_path, tinystories)
    out = subprocess.run(["ternarylm", "train", "--config", str(config)], capture_output=True,
                         text=True, env=train_env(ray_head, mlflow_uri), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"
    print("seconds:", summary["seconds"])

    client, run = only_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert TRIAL_METRICS <= set(run.data.metrics), TRIAL_METRICS - set(run.data.metrics)
    params = run.data.params
    assert params["num_workers"] == "2" and params["train.zero_stage"] == "1"
    assert run.data.tags[ZERO_STAGE_TAG] == "1"  # two ranks: the configured stage
    assert params["plan.default"] == "ternary" and params["scheme"] == "learned"
    assert run.data.tags["ternarylm.version"]
    # Every rank drew a different first batch.
    fingerprints = run.data.tags["ternarylm.rank_batch_fingerprints"].split(",")
    assert len(fingerprints) == 2 and len(set(fingerprints)) == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [5, 10, 15, 20, 25, 30]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]
    m = run.data.metrics
    assert 1 < m[M.final(M.VAL_PPL)] < 257 and m[M.final(M.VAL_BPB)] > 0
    assert m[M.final(M.TRAIN_VAL_RATIO)] == pytest.approx(
        m[M.VAL_PPL] / m[M.TRAIN_SAMPLE_PPL], rel=1e-6)
    assert 0 < m[M.SPARSITY] < 1
    assert m[M.PACKED_BYTES] < m[M.LATENT_BYTES]
    # The dry run's FLOPs (the trial's real vocabulary) are what the trial logged.
    trial = TrialConfig.from_yaml(config)
    vocab, _ = trial_vocab(trial)
    assert m[M.final(M.FLOPS)] == (trial.model_config(vocab).flops_per_token(trial.seq_len)
                                   * trial.train.steps * trial.global_batch_tokens)
    # Its data as MLflow dataset inputs (the token cache's digest), its source, its model.
    inputs = {d.dataset.name.rsplit("/", 1)[-1]: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    assert len({d.digest for d in inputs.values()}) == 1 and inputs["train"].digest
    assert run.data.tags["mlflow.source.name"] and "mlflow.source.git.dirty" in run.data.tags
    import mlflow
    from ternarylm.training.logged_model import find_model
    model = find_model(mlflow_uri, run.info.run_id)
    mlflow.set_tracking_uri(mlflow_uri)
    text = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(
        ["Once upon a time"], params={"max_new_tokens": 8, "seed": 0})
    assert len(text) == 1 and text[0].startswith("Once upon a time") and len(text[0]) > 16
    # `ternarylm pack RUN` writes a file of exactly the logged size.
    packed = tmp_path / "packed.safetensors"
    out = subprocess.run(["ternarylm", "pack", run.info.run_id, "--out", str(packed)],
                         capture_output=True, text=True, env=train_env(ray_head, mlflow_uri),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert packed.stat().st_size == m[M.final(M.PACKED_BYTES)]
    # Settings of how it runs (cadences, caps, CPUs) are not its identity: a rerun reuses it.
    rerun = trial_config(tmp_path, tinystories, eval_every=15, log_every=3,
                         eval_max_tokens=1000)
    out = subprocess.run(["ternarylm", "train", "--config", str(rerun)], capture_output=True,
                         text=True, env=train_env(ray_head, mlflow_uri), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["skipped"] and again["run_id"] == run.info.run_id
    assert "packed/model.packed.safetensors" in {
        a.path for a in client.list_artifacts(run.info.run_id, "packed")}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/block_sparsity.png"} <= artifacts
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/ternarylm.json", "model/tokenizer.json"} <= model


def wait_for_step(uri: str, step: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    client = MlflowClient(uri)
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        exp = client.get_experiment_by_name("ternarylm")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs:
            history = client.get_metric_history(runs[0].info.run_id, "train/loss")
            if max((m.step for m in history), default=0) >= step:
                return
        time.sleep(1)
    raise AssertionError(f"the trial did not reach step {step} in {timeout} s")


def test_stopped_trial_resumes_from_checkpoint(tmp_path, tinystories, ray_head, mlflow_uri):
    config = trial_config(tmp_path, tinystories, steps=60, log_every=5)
    env = train_env(ray_head, mlflow_uri)
    first = subprocess.Popen(["ternarylm", "train", "--config", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        # Metrics are flushed just before each checkpoint, so once step 30 is logged the
        # checkpoint of step 20 is certainly complete.
        wait_for_step(mlflow_uri, 30, first, timeout=400)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies: its Ray Train run goes with it
        first.wait()
    client, run = only_run(mlflow_uri)
    assert run.info.status == "RUNNING"

    second = subprocess.run(["ternarylm", "train", "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    client, run = only_run(mlflow_uri)  # the same run continued, no second one
    assert run.info.status == "FINISHED"
    resumed = int(run.data.tags["ternarylm.resumed_from_step"])
    # A checkpoint step, not a fresh start. Ray Train registers a checkpoint a moment after
    # it is written, so the newest one may be missing: then the resumed steps were logged
    # already and must not be logged twice (checked below).
    assert resumed >= 10 and resumed % 10 == 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 61, 5))  # no gap, no duplicate
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert val_steps == list(range(10, 61, 10))


@pytest.mark.parametrize("workers, stage, bf16, runs", [
    (1, 1, False, 0), (1, 2, False, 0),  # one fp32 rank: nothing to partition
    (2, 1, False, 1), (1, 1, True, 1), (1, 3, False, 3), (1, 0, False, 0)])
def test_engine_zero_stage(workers, stage, bf16, runs):
    cfg = TrialConfig(size="nano", num_workers=workers, train={"zero_stage": stage})
    assert zero_stage(cfg, bf16) == runs
    assert deepspeed_config(cfg, bf16)["zero_optimization"] == {"stage": runs}


# A one-rank gloo group as `benchmarks/train_step.py` sets it up, then a worker's engine.
ENGINE_SCRIPT = """
import sys
sys.path.append(sys.argv[1])  # benchmarks/, for train_step's process-group helper
import torch
from train_step import init_single_process_group
from ternarylm.config import TrialConfig
from ternarylm.training.train import build_engine
init_single_process_group()
engine, _ = build_engine(TrialConfig(size="pico", plan="fp"), 64, torch.device("cpu"), False)
from deepspeed.comm import comm
print("shm_comm_op", comm.cdb.shm_comm_op)
"""


def test_engine_start_builds_no_inference_comm_op(tmp_path):
    """A worker's DeepSpeed engine starts without JIT-compiling the shared-memory all-reduce
    that only DeepSpeed-Inference uses (a 36-41 s build on a fresh cache)."""
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT,
                          str(Path(__file__).resolve().parents[1] / "benchmarks")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shm_comm_op None" in out.stdout
    assert not any(extensions.glob("**/*.so")), sorted(extensions.rglob("*"))
