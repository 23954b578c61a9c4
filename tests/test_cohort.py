"""Cohorts: trials of one shape trained together, stacked on a leading axis.

The exactness tests compare a cohort member with the same trial trained alone through the
solo path (`train.build_engine`: its model in a DeepSpeed engine with torch's fused AdamW and
DeepSpeed's gradient clipping). The study tests train the same grid with and without cohorts
(real Ray, DeepSpeed and MLflow) and kill a cohort's worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from ternarylm.training.cohort import form_cohorts
from ternarylm.config import TrialConfig
from ternarylm.data import WindowSampler, eval_batches, prepare_data
from ternarylm.training.member_optim import MemberAdamW
from ternarylm.training.stacked import StackedLM, member_batches, member_losses
from ternarylm.training.train import build_engine, build_model

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after the stdlib
from train_step import init_single_process_group  # noqa: E402

STEPS = 30


def member(corpus: Path, seed: int, scheme: str, plan: str, **train) -> TrialConfig:
    return TrialConfig.from_dict({
        "size": "pico", "scheme": scheme, "plan": plan, "seed": seed, "seq_len": 32,
        "data": {"source": str(corpus), "tokenizer": "char"},
        # grad_clip 0.05: below every member's gradient norm, so clipping acts at every step.
        "train": {"steps": STEPS, "micro_batch": 4, "warmup_steps": 3, "grad_clip": 0.05,
                  "zero_stage": 0, "precision": "fp32", **train}})


@pytest.fixture
def cohort(tinystories) -> list[TrialConfig]:
    """fp, absmean, learned and an int plan (int8 boundary blocks), each with its own seed,
    learning rate, schedule, weight decay, betas and label smoothing."""
    return [
        member(tinystories, 0, "absmean", "fp", lr=3e-3),
        member(tinystories, 1, "absmean", "all_ternary", lr=5e-3, weight_decay=0.1,
               betas=[0.8, 0.95], label_smoothing=0.1),
        member(tinystories, 2, "learned", "all_ternary", lr=4e-3, schedule="wsd"),
        member(tinystories, 3, "absmean", "boundary_int8", lr=2e-3, schedule="two_stage",
               warmup_steps=2),
    ]


def val_loss(forward, tokens, seq_len: int) -> torch.Tensor:
    """Mean validation loss [M] (or [1]) of a forward from [B, T] ids to [M, B, T, V]."""
    sums, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, 8, max_tokens=2048):
        logits = forward(x)
        sums = sums + member_losses(logits, y.expand(logits.shape[0], *y.shape)) * y.numel()
        count += y.numel()
    return sums / count


@torch.no_grad()
def solo_val_loss(trial: TrialConfig, data) -> float:
    """The trial trained alone, as a worker trains it (its DeepSpeed engine, one rank)."""
    init_single_process_group()
    engine, _ = build_engine(trial, data.vocab_size, torch.device("cpu"), False)
    sampler = WindowSampler(data.tokens("train"), trial.seq_len, trial.train.micro_batch, 0,
                            1, trial.seed)
    with torch.enable_grad():
        for step in range(STEPS):
            x, y = sampler.batch(step, 0)
            loss = F.cross_entropy(engine(x).flatten(0, 1).float(), y.flatten(),
                                   label_smoothing=trial.train.label_smoothing)
            engine.backward(loss)
            engine.step()
    engine.eval()
    return float(val_loss(lambda x: engine(x)[None], data.tokens("validation"),
                          trial.seq_len)[0])


def test_member_starts_from_the_solo_weights_and_batches(cohort, one_torch_thread):
    data = prepare_data(cohort[0].data)
    stacked = StackedLM(cohort, data.vocab_size)
    samplers = [WindowSampler(data.tokens("train"), t.seq_len, t.train.micro_batch, 0, 1,
                              t.seed) for t in cohort]
    x, _ = member_batches(samplers, 5, 0)
    for m, trial in enumerate(cohort):
        solo, formats = build_model(trial, data.vocab_size)
        assert formats == stacked.formats[m]
        expected = solo.state_dict()
        got = stacked.member_model(m).state_dict()
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (m, name)
        solo_x, _ = samplers[m].batch(5, 0)
        assert torch.equal(x[m], solo_x)
        # The stacked forward gives member m the logits its own model gives.
        with torch.no_grad():
            assert torch.allclose(stacked(x)[m], solo(x[m]), rtol=1e-4, atol=1e-5), m


def test_member_trains_as_the_solo_trial(cohort, one_torch_thread):
    """After 30 steps with clipping active, each member's validation loss is the solo trial's
    within 0.2% relative."""
    data = prepare_data(cohort[0].data)
    stacked = StackedLM(cohort, data.vocab_size)
    optimizer = MemberAdamW(stacked, [t.train for t in cohort])
    samplers = [WindowSampler(data.tokens("train"), t.seq_len, t.train.micro_batch, 0, 1,
                              t.seed) for t in cohort]
    smoothing = [t.train.label_smoothing for t in cohort]
    clipped = []
    for step in range(STEPS):
        x, y = member_batches(samplers, step, 0)
        member_losses(stacked(x), y, smoothing).sum().backward()
        clipped.append(bool((optimizer.grad_norms() > 0.05).all()))
        optimizer.step()
        optimizer.zero_grad()
    assert all(clipped)
    stacked.eval()
    with torch.no_grad():
        cohort_loss = val_loss(lambda x: stacked(x.expand(len(cohort), *x.shape)),
                               data.tokens("validation"), cohort[0].seq_len)
    for m, trial in enumerate(cohort):
        solo = solo_val_loss(trial, data)
        print(f"member {m} {trial.scheme}/{trial.plan.name}: cohort {float(cohort_loss[m]):.6f} "
              f"solo {solo:.6f} rel {abs(float(cohort_loss[m]) - solo) / solo:.2e}")
        assert abs(float(cohort_loss[m]) - solo) / solo < 2e-3, m


# ------------------------------------------------------------------- which trials form cohorts

def test_cohorts_group_trials_of_one_shape_up_to_the_limit(cohort, tinystories):
    """Seeds, plans, schemes and optimiser settings may differ within a cohort; a different
    shape (steps, batch, size) starts another, and a trial one engine cannot hold exactly
    (bf16, dropout, ZeRO partitioning) trains alone."""
    other_steps = member(tinystories, 5, "absmean", "fp", steps=STEPS + 1)
    bf16 = member(tinystories, 6, "absmean", "fp", precision="bf16")
    dropout = TrialConfig.from_dict(cohort[0].to_dict() | {"dropout": 0.1})
    two_workers = TrialConfig.from_dict(cohort[0].to_dict() | {"num_workers": 2})
    late = member(tinystories, 7, "learned", "fp")
    trials = [*cohort, other_steps, bf16, dropout, two_workers, late]
    groups = form_cohorts(trials, limit=3)
    assert [[trials.index(t) for t in g] for g in groups] == [
        [0, 1, 2], [3, 8], [4], [5], [6], [7]]
    assert [len(g) for g in form_cohorts(cohort, limit=1)] == [1, 1, 1, 1]


# ------------------------------------------------------- a study with and without cohorts

REPO = Path(__file__).resolve().parents[1]


def cohort_study(path: Path, corpus: Path, name: str, tokens: int, **extra) -> Path:
    """pico, fp and absmean/all_ternary, seeds 0 and 1: four trials of one shape; with
    cohort_size 3, a cohort of three and one trial alone."""
    config = {
        "name": name, "sizes": ["pico"], "schemes": ["absmean"], "plans": ["fp", "all_ternary"],
        "seeds": [0, 1], "tokens": tokens, "evals_per_trial": 2, "max_concurrent": 2,
        "cohort_size": 3,
        "trial": {"seq_len": 64, "num_workers": 1, "max_failures": 0,
                  "data": {"source": str(corpus), "tokenizer": "char"},
                  "train": {"micro_batch": 8, "lr": 3e-3, "eval_max_tokens": 2048,
                            "train_sample_tokens": 2048}}} | extra
    path.write_text(yaml.safe_dump(config))
    return path


def study(config: Path, env: dict, uri: str, *args: str, timeout: float = 600
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                           str(config), "--json", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "MLFLOW_TRACKING_URI": uri})


def trial_runs(uri: str) -> dict[str, object]:
    """The study's trial runs by trial key."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ternarylm")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {r.data.tags["ternarylm.trial_key"]: r for r in runs
            if "ternarylm.trial_key" in r.data.tags}


@pytest.mark.slow
def test_cohort_members_match_their_solo_trials(tmp_path, tinystories, ray_head, monkeypatch):
    """The same grid with and without cohorts: every trial FINISHED with the same metric
    names and final/ summary, final val loss within 0.2%, and a cohort member's logged packed
    file byte for byte what `ternarylm pack` writes from its logged model."""
    config = cohort_study(tmp_path / "study.yaml", tinystories, "cohorts", tokens=6144)
    env = {**os.environ, **ray_head}
    uris = {mode: f"sqlite:///{tmp_path / mode}.db" for mode in ("cohort", "solo")}
    took, stdout = {}, {}
    for mode, args in (("cohort", ()), ("solo", ("--no-cohorts",))):
        started = time.perf_counter()
        out = study(config, env, uris[mode], *args)
        took[mode], stdout[mode] = time.perf_counter() - started, out.stdout
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert len(json.loads(out.stdout.strip().splitlines()[-1])["trained"]) == 4
    print(f"study wall: cohorts {took['cohort']:.1f} s, solo {took['solo']:.1f} s")
    cohort, solo = trial_runs(uris["cohort"]), trial_runs(uris["solo"])
    assert cohort.keys() == solo.keys() and len(cohort) == 4
    members = [k for k, r in cohort.items() if r.data.tags.get("ternarylm.cohort")]
    assert len(members) == 3
    for key, run in cohort.items():
        alone = solo[key]
        assert run.info.status == alone.info.status == "FINISHED"
        steps = int(run.data.params["train.steps"])  # one progress line per evaluation
        assert stdout["cohort"].count(f"{run.info.run_name}: step {steps}/{steps} ") == 1
        assert set(run.data.metrics) == set(alone.data.metrics), key
        a, b = run.data.metrics["final/val/loss"], alone.data.metrics["final/val/loss"]
        print(f"{run.info.run_name}: cohort {a:.6f} solo {b:.6f} rel {abs(a - b) / b:.2e}")
        assert abs(a - b) / b < 2e-3, run.info.run_name
    from ternarylm.deploy.packing import pack

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris["cohort"])
    for key in members:
        run_id = cohort[key].info.run_id
        logged = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="packed/model.packed.safetensors",
            tracking_uri=uris["cohort"], dst_path=str(tmp_path / run_id))
        repacked = pack(run_id, tmp_path / f"{run_id}.repacked.safetensors")
        assert Path(logged).read_bytes() == repacked.path.read_bytes(), key


def cluster_processes(ray_head: dict, marker: str) -> list[psutil.Process]:
    """Processes of the test's own Ray cluster (its session: the GCS on its port) whose
    command line holds `marker`; another cluster on the machine is left alone."""
    port = ray_head["RAY_ADDRESS"].rsplit(":", 1)[1]
    procs = list(psutil.process_iter(["cmdline"]))
    gcs = [p for p in procs if f"--gcs_server_port={port}" in " ".join(p.info["cmdline"] or [])]
    assert gcs, "the test cluster's GCS was not found"
    sid = os.getsid(gcs[0].pid)
    return [p for p in procs if marker in " ".join(p.info["cmdline"] or [])
            and os.getsid(p.pid) == sid]


def wait_and_kill_the_worker(uri: str, proc: subprocess.Popen, ray_head: dict) -> None:
    """Once both members logged step 200 (metrics reach MLflow just before each checkpoint,
    every 100 steps: the step-100 checkpoint is stored), SIGKILL the cohort's one worker."""
    client = MlflowClient(uri)
    deadline = time.time() + 400
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        runs = trial_runs(uri) if Path(uri.removeprefix("sqlite:///")).exists() else {}
        steps = [max((m.step for m in client.get_metric_history(r.info.run_id, "train/loss")),
                     default=0) for r in runs.values()]
        if len(steps) == 2 and min(steps) >= 200:
            break
        time.sleep(0.5)
    workers = cluster_processes(ray_head, "RayTrainWorker")
    assert len(workers) == 1, workers  # one worker group trains both members
    workers[0].send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_killed_cohort_worker_resumes_every_member(tmp_path, tinystories, ray_head):
    """A cohort's worker killed after a checkpoint: the worker group restarts, every member
    resumes at the cohort's checkpoint step, and each member's metrics have no gap or repeat."""
    config = cohort_study(tmp_path / "study.yaml", tinystories, "resume", tokens=64 * 8 * 400,
                          plans=["all_ternary"], cohort_size=2, evals_per_trial=4)
    raw = yaml.safe_load(config.read_text())
    raw["trial"]["max_failures"] = 2
    config.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                             str(config), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri})
    try:
        wait_and_kill_the_worker(uri, proc, ray_head)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()  # a failed wait leaves no study running
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    client = MlflowClient(uri)
    runs = trial_runs(uri)
    assert len(runs) == 2
    resumed = {int(r.data.tags["ternarylm.resumed_from_step"]) for r in runs.values()}
    assert len(resumed) == 1 and resumed <= {100, 200, 300}, resumed
    for run in runs.values():
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(10, 401, 10)), run.info.run_name
        evals = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert evals == [100, 200, 300, 400], run.info.run_name


DIVERGING_COHORT = """
import json, sys
from ternarylm.training.cohort import run_cohort
from ternarylm.config import TrialConfig
base = json.loads(sys.argv[1])
nan = {**base, "seed": 1, "train": {**base["train"], "inject_nan_at_step": 3}}
results = run_cohort([TrialConfig.from_dict(base), TrialConfig.from_dict(nan)])
print(json.dumps([[r.status, r.failure] for r in results]))
"""


@pytest.mark.slow
def test_a_diverging_member_fails_and_the_others_finish(tmp_path, tinystories, ray_head):
    trial = {"size": "pico", "plan": "all_ternary", "seq_len": 32, "max_failures": 0,
             "data": {"source": str(tinystories), "tokenizer": "char"},
             "storage_path": str(tmp_path / "runs"),
             "train": {"steps": 8, "micro_batch": 4, "warmup_steps": 1, "eval_every": 4,
                       "checkpoint_every": 4, "log_every": 1, "eval_max_tokens": 1024,
                       "train_sample_tokens": 1024}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-c", DIVERGING_COHORT, json.dumps(trial)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-3000:]
    (ok, ok_failure), (bad, bad_failure) = json.loads(out.stdout.strip().splitlines()[-1])
    assert (ok, ok_failure, bad) == ("FINISHED", None, "FAILED")
    assert "diverged: loss became nan at step 3" in bad_failure
    client = MlflowClient(uri)
    runs = sorted(trial_runs(uri).values(), key=lambda r: r.data.params["seed"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    losses = [[m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
              for r in runs]
    assert losses == [list(range(1, 9)), [1, 2, 3]]
    assert "final/val/loss" in runs[0].data.metrics
    assert not any(k.startswith("final/") for k in runs[1].data.metrics)
