"""Reliability: a worker killed mid-trial, a diverging trial inside a study, and bad input
refused before anything starts, each with a clear message."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm import tracking
from ternarylm.config import TrialConfig, load_yaml
from ternarylm.data import DataConfig, WindowSampler, prepare_data
from ternarylm.core.errors import UserError
from ternarylm.model.transformer import SIZES, ModelConfig
from ternarylm.model.plans import PRESETS
from ternarylm.orchestration.study import StudyConfig

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


# ---------------------------------------------------------------- faults

RACE = """
import os, sys, time
from ternarylm.tracking import check_tracking
open(sys.argv[2] + ".ready" + sys.argv[3], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
check_tracking(sys.argv[1])
"""


def test_a_new_sqlite_store_raced_by_four_processes_is_made_once(tmp_path):
    """Four processes open one brand-new SQLite store at the same moment (each waits, MLflow
    imported, for a go file): every one finds it usable, none is told the store "does not
    answer" (on main's code, 7 of 8 such processes were)."""
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(go), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 4 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)[-3000:]
    assert MlflowClient(uri).search_experiments()  # the Default experiment: one store, made


def study_runs(uri: str) -> dict:
    client = tracking.client(uri)  # under the store's lock: the study may be creating it
    exp = client.get_experiment_by_name("ternarylm")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def wait_for_runs(uri: str, proc: subprocess.Popen, ready, timeout: float = 600) -> dict:
    """The study's runs by name once `ready(runs)` holds (the study still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        runs = study_runs(uri)
        if ready(runs):
            return runs
        time.sleep(0.2)
    raise AssertionError(f"the study did not get there in {timeout} s: {list(study_runs(uri))}")


def trial_runs(runs: dict) -> list:
    return [r for n, r in runs.items() if not n.startswith("study-")]


@pytest.mark.slow
def test_ctrl_c_mid_study_is_no_success_and_a_second_copy_is_refused(tmp_path, tinystories,
                                                                     ray_head, request):
    """Two pico trials one after the other: while the first trains, a second copy of the
    study is refused in one line; Ctrl-C once the second trains ends the study with exit
    status 130: the finished trial kept, the other KILLED, the parent run KILLED naming it, and
    the last line says to run the command again, which then trains only what was left (on
    main's code: exit 0, the parent FINISHED, the trial RUNNING, Tune's `Tuner.restore` last,
    and the second copy trained both trials again)."""
    config = study_yaml(tmp_path / "study.yaml", tinystories, ["pico"], ["all_ternary"],
                        name="ctrlc")
    # 1,000 steps (about 5 s of a pico trial): the second trial still trains once the second
    # copy of the study has been refused. One after the other: no cohort.
    raw = yaml.safe_load(config.read_text()) | {"seeds": [0, 1], "max_concurrent": 1,
                                                "tokens": 512_000, "cohorts": False}
    config.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri,
           "TERNARYLM_STORAGE_PATH": str(tmp_path / "runs")}
    command = [sys.executable, str(REPO / "studies" / "scaling.py"), "--config", str(config),
               "--json"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own group, as in a shell

    def stop() -> None:  # a failed assert leaves no study training on the shared head
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    request.addfinalizer(stop)
    wait_for_runs(uri, proc, trial_runs)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "study ctrlc is already running (pid" in lines[0], lines
    wait_for_runs(uri, proc, lambda runs: len(trial_runs(runs)) == 2
                  and {r.info.status for r in trial_runs(runs)} == {"FINISHED", "RUNNING"})
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to every process of the foreground group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Tuner.restore" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted with 1 of 2 trials unfinished" in last, err[-3000:]
    assert last.endswith("run the same command again to resume (--verbose shows the traceback)")
    runs = study_runs(uri)
    (done,) = [r for r in trial_runs(runs) if r.info.status == "FINISHED"]
    (left,) = [r for r in trial_runs(runs) if r.info.run_id != done.info.run_id]
    assert left.info.status == "KILLED"
    parent = runs["study-ctrlc"]
    assert parent.info.status == "KILLED"
    assert parent.data.tags["ternarylm.unfinished"] == left.info.run_name
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["trained"] == [left.info.run_name]
    assert summary["skipped"] == [done.info.run_name]
    runs = study_runs(uri)
    assert {r.info.status for r in runs.values()} == {"FINISHED"} and len(runs) == 3
    assert "ternarylm.unfinished" not in runs["study-ctrlc"].data.tags


def pico_trial(tmp_path: Path, corpus: Path, steps: int, every: int, **extra) -> Path:
    """A one-worker pico trial with a checkpoint (and evaluation) every `every` steps."""
    config = trial_config(tmp_path, corpus, steps=steps, warmup_steps=1, eval_every=every,
                          checkpoint_every=every, log_every=every)
    raw = yaml.safe_load(config.read_text()) | {"num_workers": 1, "size": "pico", **extra}
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_quarantined_and_the_trial_resumes(
        tmp_path, tinystories, ray_head, mlflow_uri):
    """A trial left unfinished (its run KILLED, as a Ctrl-C leaves it) whose newest checkpoint
    (step 6) was truncated: the rerun renames that checkpoint `.corrupt`, says so in one line,
    and resumes from step 4 (on main's code: every worker attempt failed in load_checkpoint)."""
    config = pico_trial(tmp_path, tinystories, steps=6, every=2)
    env = train_env(ray_head, mlflow_uri)
    first = run_cli(["train", "--config", str(config)], env)
    assert first.returncode == 0, first.stderr[-3000:]
    client, run = only_run(mlflow_uri)
    client.set_terminated(run.info.run_id, "KILLED")
    checkpoints = sorted((tmp_path / "runs").glob("trial-*/checkpoint_2*"))
    assert len(checkpoints) == 3
    states = checkpoints[-1] / "ckpt" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    again = run_cli(["train", "--config", str(config)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    (line,) = [ln for ln in again.stderr.splitlines() if "cannot be loaded" in ln]
    assert checkpoints[-1].name in line and "resumed from step 4" in line
    assert not checkpoints[-1].exists()
    assert Path(f"{checkpoints[-1]}.corrupt", "ckpt", states.name).stat().st_size == 1000
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ternarylm.resumed_from_step"] == "4"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only) as checkpoint storage; `grow()` gives it room after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_trial_in_one_line_and_the_rerun_resumes(
        tmp_path, tinystories, ray_head, mlflow_uri, small_disk):
    """Checkpoints of a pico trial fill a 3 MiB disk: one line naming the folder and the space
    a checkpoint needs, exit status 1, the run FAILED with that reason, and no worker retry
    (max_failures 2: a retry would have resumed); with room made, the same command resumes
    from the last checkpoint that fit (on main's code: 3 worker attempts and tracebacks)."""
    disk, grow = small_disk
    config = pico_trial(tmp_path, tinystories, steps=24, every=2, max_failures=2,
                        storage_path=str(disk))
    env = train_env(ray_head, mlflow_uri)
    full = run_cli(["train", "--config", str(config)], env)
    assert_fault_line(full, f"no space left on device at {disk}/trial-", "free space there")
    assert "for the step-" in full.stderr and "MiB free" in full.stderr
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["ternarylm.failure"]
    assert "ternarylm.resumed_from_step" not in run.data.tags
    grow()
    again = run_cli(["train", "--config", str(config)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "ternarylm.disk_full" not in run.data.tags
    assert int(run.data.tags["ternarylm.resumed_from_step"]) >= 2


def test_a_deleted_run_of_a_half_finished_trial_is_said_and_trained_again(tmp_path, mlflow_uri,
                                                                          capsys):
    """The trial's unfinished run was deleted in MLflow: opening the trial again says so in one
    line and starts a new run (on main's code: a new run, silently)."""
    from ternarylm.training.trial import open_run

    cfg = TrialConfig.from_dict(with_(TRIAL, data__source=str(tmp_path / "corpus.txt")))
    first, _ = open_run(cfg, mlflow_uri, None)
    MlflowClient(mlflow_uri).delete_run(first)
    capsys.readouterr()
    again, finished = open_run(cfg, mlflow_uri, None)
    assert again != first and finished is None
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"its earlier MLflow run {first} (RUNNING when deleted) was deleted" in line
    assert line.endswith("training it again from the start under a new run")


def test_a_study_says_what_its_trials_met_where_the_user_reads(tmp_path, mlflow_uri):
    """The notes a study prints for its trials (their own lines go to their actors' logs): a
    trial whose run was deleted trains again; a trial whose newest checkpoint was quarantined
    names it. A trial with neither gets no note."""
    from ternarylm.training.train import QUARANTINED_TAG
    from ternarylm.training.trial import deleted_run_note, open_run, quarantine_note

    plain = TrialConfig.from_dict(with_(TRIAL, data__source=str(tmp_path / "corpus.txt")))
    other = TrialConfig.from_dict(with_(TRIAL, data__source=str(tmp_path / "corpus.txt"), seed=7))
    experiment_id = tracking.ensure_experiment(plain.experiment, mlflow_uri)
    gone, _ = open_run(plain, mlflow_uri, None)
    kept, _ = open_run(other, mlflow_uri, None)
    MlflowClient(mlflow_uri).delete_run(gone)
    note = deleted_run_note(mlflow_uri, experiment_id, plain)
    assert note and f"its earlier MLflow run {gone} (RUNNING when deleted) was deleted" in note
    assert deleted_run_note(mlflow_uri, experiment_id, other) is None
    assert quarantine_note(mlflow_uri, other.experiment, other) is None
    tracking.set_tags(mlflow_uri, kept, {QUARANTINED_TAG: "checkpoint X renamed; resumed"})
    assert quarantine_note(mlflow_uri, other.experiment, other) == (
        f"trial {other.run_name}: checkpoint X renamed; resumed")


@pytest.mark.slow
def test_ray_processes_of_a_killed_driver_are_stopped_by_the_next_command(
        tmp_path, tinystories, mlflow_uri, isolated_home):
    """A `ternarylm train` on a local cluster of its own, SIGKILLed mid-trial, leaves that
    cluster running; the same command again stops those processes (by the ids its driver
    recorded), says so in one line, and resumes the trial (on main's code nothing recorded
    them, and they were still running)."""
    config = pico_trial(tmp_path, tinystories, steps=200, every=20)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(["ternarylm", "train", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(mlflow_uri, 20, proc, timeout=400)
    record = json.loads((isolated_home / "ray-sessions" / f"{proc.pid}.json").read_text())
    proc.kill()
    proc.communicate(timeout=60)
    time.sleep(2)

    def alive() -> list[int]:
        found = []
        for pid, started in record["processes"]:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).create_time() == started:
                    found.append(pid)
        return found

    assert alive(), "the killed driver's cluster stopped by itself"
    again = run_cli(["train", "--config", str(config)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Ray processes left by driver {proc.pid}, which was killed" in again.stderr
    assert alive() == []
    assert only_run(mlflow_uri)[1].info.status == "FINISHED"
