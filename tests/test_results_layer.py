"""The results layer: metric names declared once, packed bytes measured from the file `pack`
writes, the dry run's vocabulary, run identity, and the MLflow experiment's kind."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from ternarylm.core import metrics as M
from ternarylm import tracking
from ternarylm.deploy.footprint import describe
from ternarylm.deploy.artifacts import save_trained
from ternarylm.config import RUN_ONLY, TrainConfig, TrialConfig
from ternarylm.data import DataConfig, build_tokenizer, eos_id, prepare_data
from ternarylm.model.transformer import TernaryLM, model_config
from ternarylm.deploy.packing import pack, pack_model, packed_contents, packed_size, provenance
from ternarylm.model.plans import PRESETS, apply_plan
from ternarylm.orchestration.study import StudyConfig, trial_table

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "ternarylm"


def _metric_prefixes() -> list[str]:
    """Every prefix a metric name starts with: the declared names' first parts, and the
    families metrics.py builds names of (final/, GLUE's dev/baseline/delta, eval/, best/, fit/)."""
    heads = {name.split("/")[0] for name in M.METRICS if "/" in name}
    built = {M.SUMMARY_PREFIX, M.GLUE_DEV_PREFIX, M.GLUE_BASELINE_PREFIX, M.GLUE_DELTA_PREFIX,
             M.EVAL_PREFIX, M.study_best("x", "y", "z"), M.study_fit("x", "y")}
    return sorted(heads | {p.split("/")[0] for p in built})


def test_metric_names_are_spelled_in_the_metrics_module_only():
    """No other module of the package, subpackages included, writes a metric name (or the
    prefix of a family of them) as a string literal."""
    pattern = re.compile(rf"^({'|'.join(map(re.escape, _metric_prefixes()))})/[A-Za-z0-9_./{{}}]*$")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "metrics.py":
            continue
        where = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if pattern.match(node.value):
                    offenders.append(f"{where}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if isinstance(first, ast.Constant) and pattern.match(str(first.value)):
                    offenders.append(f"{where}:{node.lineno}: f-string {first.value!r}")
    assert offenders == []


def test_every_summary_metric_has_a_unit_and_meaning_and_columns_are_unique():
    for m in M.METRICS.values():
        assert m.unit and len(m.meaning) > 10, m.name
    columns = [m.column for m in M.METRICS.values() if m.column]
    assert len(columns) == len(set(columns))
    assert M.final(M.VAL_BPB) == "final/val/bpb"
    assert M.finals({"final/val/bpb": 1.5, "val/bpb": 1.7}) == {M.VAL_BPB: 1.5}
    latest = {M.VAL_BPB: 1.2, M.TRAIN_LR: 1e-3, M.block_sparsity(3): 0.5}
    assert M.summary_of(latest) == {"final/val/bpb": 1.2, "final/sparsity/block_03": 0.5}


def _trained(plan_name: str, tmp_path: Path, tokenizer) -> tuple[TernaryLM, TrialConfig, dict]:
    trial = TrialConfig(size="pico", scheme="learned", plan=plan_name, seq_len=32,
                        data=DataConfig(source="unused.txt", tokenizer="char"))
    torch.manual_seed(0)
    cfg = trial.model_config(tokenizer.get_vocab_size())
    model = TernaryLM(cfg)
    formats = apply_plan(model, trial.plan, trial.scheme, cfg.n_layers)
    return model, trial, formats


@pytest.mark.parametrize("plan", sorted(PRESETS))
def test_worker_packed_bytes_equal_the_file_pack_writes(plan, tmp_path, one_torch_thread):
    """The worker's `memory/packed_bytes` is the size of the file it packs; `ternarylm pack`
    on the trial's model artifact writes a file of exactly that size (the same bytes)."""
    tokenizer = build_tokenizer("char", [])
    model, trial, formats = _trained(plan, tmp_path, tokenizer)
    worker = pack_model(model, tmp_path / "worker.safetensors", tokenizer, eos_id(tokenizer),
                        provenance=provenance(trial))
    save_trained(tmp_path / "model", model, trial, formats, tokenizer, eos_id(tokenizer))
    cli = pack(str(tmp_path / "model"), tmp_path / "cli.safetensors")
    assert worker.bytes == cli.bytes == cli.path.stat().st_size
    assert worker.sha256 == cli.sha256
    # Sizing from the same code, without writing, gives the same number.
    contents = packed_contents(model, tokenizer.to_str(), eos_id(tokenizer),
                               provenance=provenance(trial))
    assert packed_size(*contents) == worker.bytes


def test_describe_agrees_with_the_packed_file_of_paper_132m(tmp_path):
    """describe sizes the file without weights or tokenizer; a real paper-132m file differs by
    the tokenizer JSON and provenance it embeds (and safetensors' 8-byte header padding)."""
    info = describe(model_config("paper-132m"), PRESETS["all_ternary"], "absmean")
    tokenizer = build_tokenizer("char", [])
    model = TernaryLM(model_config("paper-132m"))
    apply_plan(model, PRESETS["all_ternary"], "absmean", 12)
    real = pack_model(model, tmp_path / "p.safetensors", tokenizer, 0)
    # The tokenizer JSON sits in the config JSON, which sits in the safetensors header JSON.
    embedded = (len(json.dumps(json.dumps(tokenizer.to_str()))) - len(json.dumps(json.dumps(""))))
    assert abs(real.bytes - info["packed_bytes"] - embedded) < 8
    assert info["fp32_bytes"] / info["packed_bytes"] == pytest.approx(7.70, abs=0.01)
    assert "int8 embedding and head" in info["packed_assumes"]


def test_dry_run_uses_the_tokenizers_vocabulary(tinystories, tmp_path):
    trial = {"seq_len": 64, "data": {"source": str(tinystories), "tokenizer": "bpe:300",
                                     "cache_dir": str(tmp_path / "cache")}}
    study = StudyConfig(sizes=["nano"], schemes=["absmean"], plans=["all_ternary"],
                        tokens=4096, trial=trial)
    before = trial_table(study)[0]
    assert before["vocab"] == 300  # from the spec: no cache yet
    data = prepare_data(study.trials()[0].data)
    after = trial_table(study)[0]
    assert after["vocab"] == data.vocab_size  # from the cache, exact
    t = study.trials()[0]
    assert after["flops"] == (t.model_config(data.vocab_size).flops_per_token(64)
                              * t.train.steps * t.global_batch_tokens)
    char = trial_table(StudyConfig(sizes=["nano"], schemes=["absmean"], plans=["fp"],
                                   tokens=4096, trial={"data": {"tokenizer": "char"}}))[0]
    assert char["vocab"] == 257


def test_paper_dry_run_uses_the_bert_vocabulary():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "studies" / "scaling.py"
    out = subprocess.run([sys.executable, str(script), "--preset", "paper", "--dry-run",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["vocab"] for r in rows} == {30522}
    cfg = model_config("paper-132m")
    row = rows[0]
    assert row["flops"] == cfg.flops_per_token(256) * row["tokens"]


def _run_only_fields() -> list[tuple[str, ...]]:
    out = [(f.name,) for f in dataclasses.fields(TrialConfig) if f.metadata == RUN_ONLY]
    out += [("train", f.name) for f in dataclasses.fields(TrainConfig) if f.metadata == RUN_ONLY]
    return out + [("data", "cache_dir")]


RUN_ONLY_CHANGES = {"cpus_per_worker": 3, "max_failures": 7, "experiment": "other",
                    "name": "my-run", "storage_path": "/elsewhere", "eval_every": 7,
                    "eval_max_tokens": 999, "train_sample_tokens": 333, "checkpoint_every": 9,
                    "log_every": 3, "inject_nan_at_step": 5, "cache_dir": "/tmp/other-cache",
                    "recipe": "paper"}
MODEL_CHANGES = [("size", "micro"), ("scheme", "twn"), ("plan", "fp"), ("seed", 1),
                 ("seq_len", 128), ("num_workers", 2), ("use_gpu", True),
                 ("data", "tokenizer", "bpe:512"), ("data", "source", "other.txt"),
                 ("data", "max_train_bytes", 1000), ("train", "lr", 0.01),
                 ("train", "steps", 300), ("train", "micro_batch", 4),
                 ("train", "schedule", "wsd"), ("train", "weight_decay", 0.0),
                 ("train", "label_smoothing", 0.1), ("train", "precision", "fp32"),
                 ("block", "bitnet"), ("train", "schedule", "two_stage")]


def _with(change: tuple) -> TrialConfig:
    d = TrialConfig(size="nano").to_dict()
    *path, value = change
    target = d
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return TrialConfig.from_dict(d)


def test_run_only_settings_leave_the_key_and_model_settings_change_it():
    base = TrialConfig(size="nano").key()
    fields = _run_only_fields()
    assert {f[-1] for f in fields} == set(RUN_ONLY_CHANGES)  # every run-only field is tried
    for field in fields:
        assert _with((*field, RUN_ONLY_CHANGES[field[-1]])).key() == base, field
    keys = {_with(change).key() for change in MODEL_CHANGES}
    assert base not in keys and len(keys) == len(MODEL_CHANGES)


def test_experiments_open_in_the_model_training_view(mlflow_uri):
    exp_id = tracking.ensure_experiment("kind-test", mlflow_uri)
    exp = tracking.client(mlflow_uri).get_experiment(exp_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_resumed_run_loses_the_reason_it_ended_before(tmp_path):
    from ternarylm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment("resume", uri)
    run_id = tracking.start_run(uri, exp, "trial", {}, None)
    tracking.end_run(uri, run_id, "KILLED", "stopped early by the scheduler")
    assert tracking.client(uri).get_run(run_id).data.tags[tracking.FAILURE_TAG]
    tracking.resume_run(uri, run_id)
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and tracking.FAILURE_TAG not in run.data.tags


def test_time_line_covers_only_trials_trained_in_this_launch():
    from ternarylm.orchestration.results import time_line

    rows = [{"name": "a", "trial_wall_s": 30.0, "train_loop_s": 10.0, "outside_loop_s": 20.0},
            {"name": "b", "trial_wall_s": 90.0, "train_loop_s": 50.0, "outside_loop_s": 40.0},
            {"name": "c", "trial_wall_s": None, "train_loop_s": None, "outside_loop_s": None}]
    line = time_line(rows, ["a", "c"])  # b was reused from an earlier launch; c has no times
    assert line.startswith("time: 1 trials, training loops 10 s") and "median 20.0 s" in line
    assert time_line(rows, []) is None
