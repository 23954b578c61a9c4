"""Bad input to `ternarylm train` and `studies/scaling.py`: one line on stderr, exit status 2,
and no MLflow run (nor store) left behind. Types are checked against each field's annotation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm.cli import main as ternarylm_main

from test_reliability import with_

REPO = Path(__file__).resolve().parents[1]


def _scaling_main():
    spec = importlib.util.spec_from_file_location("scaling_script", REPO / "studies" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _trial(corpus: Path, tmp_path: Path) -> dict:
    return {"size": "nano", "seq_len": 32, "max_failures": 0,
            "data": {"source": str(corpus), "tokenizer": "char"},
            "train": {"steps": 4, "micro_batch": 2, "warmup_steps": 1},
            "storage_path": str(tmp_path / "runs")}


def _set(d: dict, dotted: str, value) -> dict:
    return with_(d, **{dotted.replace(".", "__"): value})


BAD_TRIAL_FIELDS = [
    ("seq_len", "64", "trial.seq_len must be an integer, got '64'"),
    ("seq_len", 64.0, "trial.seq_len must be an integer, got 64.0"),
    ("seed", "zero", "trial.seed must be an integer"),
    ("num_workers", True, "trial.num_workers must be an integer, got True"),
    ("cpus_per_worker", 1.5, "trial.cpus_per_worker must be an integer, got 1.5"),
    ("use_gpu", "yes", "trial.use_gpu must be true or false"),
    ("max_failures", "2", "trial.max_failures must be an integer"),
    ("name", 5, "trial.name must be a string or null, got 5"),
    ("experiment", "", "experiment is empty"),
    ("plan", 3, "trial.plan must be a preset name or a mapping of settings, got 3"),
    ("plan", {"blocks": [1, 2]}, "blocks must map block indices"),
    ("data", "tinystories", "trial.data must be a mapping of settings"),
    ("data.max_train_bytes", 1.5, "trial.data.max_train_bytes must be an integer or null"),
    ("data.val_fraction", "0.1", "trial.data.val_fraction must be a number"),
    ("train.steps", 10.5, "trial.train.steps must be an integer, got 10.5"),
    ("train.lr", "3e-3", "trial.train.lr must be a number, got '3e-3' (YAML reads 3e-3 as text"),
    ("train.betas", [0.9], "trial.train.betas must be a list of 2 values"),
    ("train.betas", [0.9, "x"], "trial.train.betas[1] must be a number"),
    ("train.zero_stage", 1.0, "trial.train.zero_stage must be an integer"),
    ("train.eval_max_tokens", "all", "trial.train.eval_max_tokens must be an integer or null"),
    ("train.label_smoothing", True, "trial.train.label_smoothing must be a number, got True"),
]


def _assert_refused(code: int, err: str, message: str, uri: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():  # nothing half made in MLflow
        client = MlflowClient(uri)
        assert not [r for e in client.search_experiments()
                    for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("field, value, message", BAD_TRIAL_FIELDS,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_TRIAL_FIELDS])
def test_wrongly_typed_trial_fields_are_refused(field, value, message, tinystories, tmp_path,
                                                mlflow_uri, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_set(_trial(tinystories, tmp_path), field, value)))
    code = ternarylm_main(["train", "--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)


def test_unwritable_storage_is_refused_before_any_run(tinystories, tmp_path, mlflow_uri, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_set(_trial(tinystories, tmp_path), "storage_path",
                                          str(blocker / "runs"))))
    code = ternarylm_main(["train", "--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, "is not writable", mlflow_uri)


def _study(corpus: Path) -> dict:
    return {"name": "bad", "sizes": ["nano"], "schemes": ["absmean"], "plans": ["fp"],
            "seeds": [0], "tokens": 2048,
            "trial": {"seq_len": 32, "data": {"source": str(corpus), "tokenizer": "char"}}}


BAD_STUDY_FIELDS = [
    ("seeds", [0, "1"], "study.seeds[1] must be an integer"),
    ("sizes", "nano", "study.sizes must be a list, got 'nano'"),
    ("tokens", "1e5", "study.tokens must be an integer or null"),
    ("evals_per_trial", 2.5, "study.evals_per_trial must be an integer"),
    ("name", "", "study.name is empty"),
    ("per_size", {"nano": 3}, "study.per_size.nano must be a mapping"),
    ("max_concurrent", "2", "study.max_concurrent must be an integer"),
    ("trial.train.micro_batch", 2.5, "trial.train.micro_batch must be an integer"),
    ("cohort_size", "4", "study.cohort_size must be an integer, got '4'"),
    ("cohort_size", 2.5, "study.cohort_size must be an integer, got 2.5"),
    ("cohort_size", True, "study.cohort_size must be an integer, got True"),
    ("cohorts", "no", "study.cohorts must be true or false, got 'no'"),
]


@pytest.mark.parametrize("field, value, message", BAD_STUDY_FIELDS,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_STUDY_FIELDS])
def test_wrongly_typed_study_fields_are_refused(field, value, message, tinystories, tmp_path,
                                                mlflow_uri, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_set(_study(tinystories), field, value)))
    code = _scaling_main()(["--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)


def test_study_with_unwritable_storage_is_refused(tinystories, tmp_path, mlflow_uri, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_study(tinystories)))
    code = _scaling_main()(["--config", str(config), "--storage-path", str(blocker / "runs")])
    _assert_refused(code, capsys.readouterr().err, "is not writable", mlflow_uri)


# ------------------------------------------------- non-finite numbers, names, repeats, files

NON_FINITE = [("train.lr", float("nan")), ("train.grad_clip", float("inf")),
              ("train.weight_decay", float("-inf")), ("train.betas", [0.9, float("nan")]),
              ("dropout", float("nan")), ("data.val_fraction", float("inf")),
              ("train.weight_decay_stage2_at", float("nan"))]


@pytest.mark.parametrize("field, value", NON_FINITE, ids=[f for f, _ in NON_FINITE])
def test_non_finite_numbers_are_refused(field, value, tinystories, tmp_path, mlflow_uri, capsys):
    config = tmp_path / "trial.yaml"  # safe_dump writes YAML's own .nan / .inf
    config.write_text(yaml.safe_dump(_set(_trial(tinystories, tmp_path), field, value)))
    code = ternarylm_main(["train", "--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, "must be a finite number", mlflow_uri)


BAD_STUDY_VALUES = [
    ("tokens_per_param", float("inf"), "study.tokens_per_param must be a finite number, got inf"),
    ("warmup_fraction", float("nan"), "study.warmup_fraction must be a finite number, got nan"),
    ("trial.train.lr", float("nan"), "trial.train.lr must be a finite number, got nan"),
    ("name", "../../../../tmp/escape", "study.name '../../../../tmp/escape' may hold only"),
    ("name", "a b", "study.name 'a b' may hold only letters, digits"),
    ("name", "..", "study.name '..' may hold only"),
    ("seeds", [0, 0], "study.seeds repeats a seed ([0, 0])"),
    ("cohort_size", 0, "study.cohort_size must be a positive integer (the most trials trained "
                       "together), got 0; set it to 1 or more, or turn cohorts off"),
    ("cohort_size", -3, "study.cohort_size must be a positive integer"),
]


@pytest.mark.parametrize("field, value, message", BAD_STUDY_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_STUDY_VALUES])
def test_bad_study_values_are_refused(field, value, message, tinystories, tmp_path, mlflow_uri,
                                      capsys):
    study = _set(_study(tinystories), field, value)
    if field == "tokens_per_param":
        del study["tokens"]
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    code = _scaling_main()(["--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)
    assert not (tmp_path.parent / "escape").exists()


MALFORMED_YAML = [
    ("size: nano\n\tseed: 1\n", "(line 2, column 1: found character '\\t' that cannot start"),
    ("size: !!python/object:os.system {}\n", "(line 1, column 7: could not determine a "
                                             "constructor for the tag"),
    ("size: [nano\n", "(line 2, column 1: expected ',' or ']'"),
]


@pytest.mark.parametrize("text, message", MALFORMED_YAML, ids=["tab", "python-tag", "unclosed"])
def test_malformed_yaml_is_one_line(text, message, tmp_path, mlflow_uri, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text(text)
    code = ternarylm_main(["train", "--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)
    code = _scaling_main()(["--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "cannot be read as .jsonl (JSON parse"),
    ("bad.parquet", b"not parquet at all\n", "cannot be read as .parquet (Parquet magic bytes"),
], ids=["jsonl", "parquet"])
def test_unreadable_table_data_is_one_line(name, content, message, tmp_path, mlflow_uri, capsys):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_trial(corpus, tmp_path)))
    code = ternarylm_main(["train", "--config", str(config)])
    _assert_refused(code, capsys.readouterr().err, message, mlflow_uri)


USAGE_ERRORS = [
    (["export"], "ternarylm export: error: the following arguments are required: source, out, "
                 "--format; see ternarylm export --help"),
    (["export", "run", "out", "--format", "onnx"], "ternarylm export: error: argument --format: "
                                                   "invalid choice: 'onnx'"),
    (["train"], "ternarylm train: error: the following arguments are required: --config"),
    (["generate", "--model", "m", "--temperature", "nan"],
     "ternarylm generate: error: argument --temperature: 'nan' is not a finite number"),
    (["allocate", "run", "--budget-bits", "inf"], "'inf' is not a finite number"),
    (["describe", "--size", "huge"], "ternarylm describe: error: argument --size: invalid choice"),
    (["frobnicate"], "ternarylm: error: argument command: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        ternarylm_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_study_script_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        _scaling_main()(["--preset", "nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "argument --preset: invalid choice" in err, err
