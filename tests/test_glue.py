"""GLUE fine-tuning (ternarylm.evaluation.glue) on the real GLUE files in shared/data.

The data directory comes from $TERNARYLM_SHARED_DATA, default <repo>/../shared/data; the GLUE
TSVs are in its glue/ folder. The pretrained model is a randomly initialised tiny all-ternary
TernaryLM with a char tokenizer, saved as a trained-model artifact in tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from ternarylm.evaluation import glue
from ternarylm.deploy.artifacts import ARTIFACT_PATH, load_trained, save_trained
from ternarylm.config import TrialConfig
from ternarylm.data import DataError, build_tokenizer, eos_id
from ternarylm.evaluation.glue import GlueData, GlueDataError, GlueError, GlueSettings
from ternarylm.model.transformer import TernaryLM
from ternarylm.model.plans import apply_plan, convert
from ternarylm.model.quantizers import QuantLinear

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
GLUE_DIR = SHARED_DATA / "glue"
MRPC = GLUE_DIR / "MRPC"
needs_glue = pytest.mark.skipif(
    not (MRPC / "train.tsv").is_file(),
    reason=f"{MRPC} missing: set TERNARYLM_SHARED_DATA to the shared data directory")

SEQ_LEN = 96
# Small but real: a few hundred MRPC pairs, one epoch, dev subset except where noted.
QUICK = {"epochs": 1, "max_train_examples": 192, "max_dev_examples": 128, "batch_size": 32,
         "lr": 3e-4, "eval_batch_size": 128}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny all-ternary model with a char tokenizer, saved as a trained-model artifact."""
    tok = build_tokenizer("char", [])
    trial = TrialConfig(size="tiny", seq_len=SEQ_LEN, plan="all_ternary",
                        data={"source": str(MRPC / "train.tsv"), "tokenizer": "char"})
    torch.manual_seed(0)
    model = TernaryLM(trial.model_config(vocab_size=tok.get_vocab_size()))
    formats = apply_plan(model, trial.plan, trial.scheme, model.cfg.n_layers)
    return save_trained(tmp_path_factory.mktemp("tiny") / "model", model, trial, formats, tok,
                        eos_id(tok))


def ternary_codes_ok(model: torch.nn.Module) -> bool:
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return bool(qs) and all(
        set(m.weight_quantizer.quantize(m.weight).codes.unique().tolist()) <= {-1, 0, 1}
        for m in qs)


# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed confusion matrices


def confusion(tp: int, fp: int, fn: int, tn: int) -> tuple[list[int], list[int]]:
    y_true = [1] * tp + [0] * fp + [1] * fn + [0] * tn
    y_pred = [1] * tp + [1] * fp + [0] * fn + [0] * tn
    return y_true, y_pred


@pytest.mark.parametrize("tp,fp,fn,tn", [(5, 2, 3, 10), (40, 7, 1, 2), (3, 9, 12, 30)])
def test_metrics_match_hand_computed_confusion_matrices(tp, fp, fn, tn):
    y_true, y_pred = confusion(tp, fp, fn, tn)
    n = tp + fp + fn + tn
    f1 = 2 * tp / (2 * tp + fp + fn)
    acc = (tp + tn) / n
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.glue_metrics("mrpc", y_true, y_pred) == pytest.approx({"f1": f1, "accuracy": acc})
    assert glue.glue_metrics("sst2", y_true, y_pred) == pytest.approx({"accuracy": acc})
    assert glue.glue_metrics("cola", y_true, y_pred) == pytest.approx({"mcc": mcc, "accuracy": acc})


def test_constant_predictions_and_majority():
    # Always-positive: F1 = 2P / (2P + N); MCC of a constant prediction is 0; never-positive F1 0.
    y_true = [1] * 7 + [0] * 3
    assert glue.glue_metrics("mrpc", y_true, [1] * 10)["f1"] == pytest.approx(14 / 17)
    assert glue.glue_metrics("mrpc", y_true, [0] * 10)["f1"] == 0.0
    assert glue.glue_metrics("cola", y_true, [1] * 10)["mcc"] == 0.0
    assert glue.majority_label([0, 1, 1]) == 1 and glue.majority_label([0, 0, 1]) == 0
    assert glue.majority_label([1, 0]) == 0  # tie -> the smaller label
    with pytest.raises(GlueError):
        glue.majority_label([])


@needs_glue
def test_mrpc_dev_majority_baseline():
    train, dev = glue.load_glue("mrpc", "train", GLUE_DIR), glue.load_glue("mrpc", "dev", GLUE_DIR)
    assert (len(dev), sum(dev.labels)) == (408, 279)
    label, baseline = glue.majority_baseline("mrpc", train.labels, dev.labels)
    assert label == 1  # 2,473 of 3,667 train pairs are paraphrases
    assert round(baseline["f1"], 3) == 0.812
    assert baseline["f1"] == pytest.approx(2 * 279 / (2 * 279 + 129))
    assert baseline["accuracy"] == pytest.approx(279 / 408)


# ---------------------------------------------------------------------------------------------
# Loaders


@needs_glue
def test_mrpc_loader_keeps_quotes_and_drops_bom():
    train = glue.load_glue("mrpc", "train", GLUE_DIR)
    dev = glue.load_glue("mrpc", "dev", GLUE_DIR)
    assert (MRPC / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert (len(train), sum(train.labels)) == (3667, 2473)
    assert train.text_a[0] == ("Amrozi accused his brother , whom he called \" the witness \" , "
                               "of deliberately distorting his evidence .")
    assert train.labels[0] == 1
    # A sentence that starts with a quote: csv's default quoting would swallow it and the rest.
    assert dev.text_a[0] == ("He said the foodservice pie business doesn 't fit the company 's "
                             "long-term growth strategy .")
    assert dev.text_b[0] == ("\" The foodservice pie business does not fit our long-term "
                             "growth strategy .")
    assert sum(s.count('"') for s in dev.text_a + dev.text_b) == (MRPC / "dev.tsv").read_text(
        encoding="utf-8").count('"')
    assert not any("\ufeff" in s for s in train.text_a + train.text_b)
    assert train.source == str(MRPC / "train.tsv")


@needs_glue
def test_cola_without_header_and_sst2_counts():
    cola_train = glue.load_glue("cola", "train", GLUE_DIR)
    cola_dev = glue.load_glue("CoLA", "dev", GLUE_DIR)
    assert (len(cola_train), sum(cola_train.labels)) == (8551, 6023)
    assert cola_train.text_a[0] == ("Our friends won't buy this analysis, let alone the next one "
                                    "we propose.")
    assert cola_train.text_b is None
    assert (len(cola_dev), sum(cola_dev.labels)) == (1043, 721)  # last line has no newline
    assert cola_dev.text_a[-1].endswith("about himself.")
    sst_train = glue.load_glue("sst2", "train", GLUE_DIR)
    sst_dev = glue.load_glue("SST-2", "dev", GLUE_DIR)
    assert (len(sst_train), sum(sst_train.labels)) == (67349, 37569)
    assert (len(sst_dev), sum(sst_dev.labels)) == (872, 444)
    assert sst_dev.text_a[0] == "it 's a charming and often affecting journey ."  # stripped
    # The task folder itself also works as the data directory.
    assert len(glue.load_glue("mrpc", "dev", MRPC)) == 408


def test_loader_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(GlueDataError, match=re.escape(str(tmp_path / "nowhere"))):
        glue.load_glue("mrpc", "train", tmp_path / "nowhere")
    (tmp_path / "MRPC").mkdir()
    with pytest.raises(GlueDataError, match=r"MRPC/dev\.tsv.*not found"):
        glue.load_glue("mrpc", "dev", tmp_path)
    bad = tmp_path / "MRPC" / "train.tsv"
    bad.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                   "1\t1\t2\ta\tb\nyes\t3\t4\tc\td\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=re.escape(f"{bad}, line 3: label 'yes'")):
        glue.load_glue("mrpc", "train", tmp_path)
    bad.write_text("1\t1\t2\ta\tb\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=re.escape(f"{bad}, line 1: expected the MRPC header")):
        glue.load_glue("mrpc", "train", tmp_path)
    (tmp_path / "CoLA").mkdir()
    cola = tmp_path / "CoLA" / "train.tsv"
    cola.write_text("source\tlabel\toriginal\tsentence\nx\t1\t\tFine.\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"line 1: label 'label'.*no header"):
        glue.load_glue("cola", "train", tmp_path)
    cola.write_text("x\t1\tFine.\n", encoding="utf-8")
    expected = re.escape(f"{cola}, line 1: expected 4") + ".*columns, found 3"
    with pytest.raises(GlueDataError, match=expected):
        glue.load_glue("cola", "train", tmp_path)
    with pytest.raises(GlueError, match="unknown GLUE task 'qqp'"):
        glue.load_glue("qqp", "train", tmp_path)
    # $TERNARYLM_GLUE_DIR is the default folder.
    monkeypatch.setenv(glue.GLUE_DIR_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(GlueDataError, match=re.escape(str(tmp_path / "elsewhere"))):
        glue.load_glue("sst2", "dev")
    assert issubclass(GlueDataError, DataError)


def test_no_local_folder_and_no_hub_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(glue.GLUE_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GlueDataError, match=r"nyu-mll/glue.*HF_HUB_OFFLINE.*--data-dir.*"
                                            r"TERNARYLM_GLUE_DIR"):
        glue.load_glue("mrpc", "train")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(GlueDataError, match=r"Couldn't reach.*TERNARYLM_GLUE_DIR"):
        glue.load_glue("cola", "dev")


def test_hub_loader_maps_columns(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if config == "mrpc":
            return [{"sentence1": "A b .", "sentence2": "\" B a .", "label": 1, "idx": 0},
                    {"sentence1": "C .", "sentence2": "D .", "label": 0, "idx": 1}]
        return [{"sentence": "fine . ", "label": 1, "idx": 0}]
    monkeypatch.delenv(glue.GLUE_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dev = glue.load_glue("mrpc", "dev")
    assert (dev.text_a, dev.text_b, dev.labels) == (["A b .", "C ."], ["\" B a .", "D ."], [1, 0])
    assert dev.source == "hub:nyu-mll/glue/mrpc/validation"
    sst = glue.load_glue("sst2", "train")
    assert (sst.text_a, sst.text_b, sst.labels) == (["fine ."], None, [1])
    assert calls == [("nyu-mll/glue", "mrpc", "validation"), ("nyu-mll/glue", "sst2", "train")]


# ---------------------------------------------------------------------------------------------
# Encoding and pooling


def test_pair_encoding_uses_eos_separator_and_truncates_to_seq_len():
    tok = build_tokenizer("char", [])
    eos = eos_id(tok)
    data = GlueData("mrpc", "dev", ["abc", "x" * 50, "short"], ["de", "y" * 20, "z" * 90],
                    [1, 0, 1], "test")
    ids = glue.encode(tok, data, eos, 32)
    assert ids[0] == [*b"abc", eos, *b"de"]  # char tokenizer: id == byte
    assert all(len(s) <= 32 for s in ids) and [s.count(eos) for s in ids] == [1, 1, 1]
    assert ids[1] == [*b"x" * 15, eos, *b"y" * 16]  # longer loses first, then both alternately
    assert ids[2] == [*b"short", eos, *b"z" * 26]
    single = glue.encode(tok, GlueData("sst2", "dev", ["a" * 40, ""], None, [1, 0], "t"), eos, 32)
    assert single == [[ord("a")] * 32, [eos]]
    for la in range(12):
        for lb in range(12):
            a, b = glue.truncate_pair(la, lb, 10)
            assert a + b == min(la + lb, 10) and 0 <= a <= la and 0 <= b <= lb
            if la + lb > 10:  # longest first: the kept lengths differ by at most one
                assert abs(a - b) <= 1 or min(a, b) == min(la, lb)


def test_pooling_ignores_padding(model_dir):
    trained = load_trained(model_dir)
    seqs = [[5, 6, 7], list(range(10, 30)), [9]]
    for pooling in glue.POOLINGS:
        clf = glue.GlueClassifier(trained.model, pooling=pooling).eval()
        with torch.no_grad():
            batched = clf(*glue.pad_batch(seqs, pad_id=trained.eos_id))
            for pad_id in (0, 200):  # the padding id must not matter either
                assert torch.allclose(clf(*glue.pad_batch(seqs, pad_id)), batched, atol=1e-5)
            alone = torch.cat([clf(*glue.pad_batch([s], trained.eos_id)) for s in seqs])
        assert torch.allclose(batched, alone, atol=1e-5), pooling
    hidden = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[True, True, False, False]])
    assert glue.pool(hidden, mask, "mean").tolist() == [[1.5, 2.5, 3.5]]
    assert glue.pool(hidden, mask, "last").tolist() == [[3.0, 4.0, 5.0]]


def test_settings_validation():
    with pytest.raises(GlueError, match="pooling"):
        GlueSettings(pooling="cls")
    with pytest.raises(GlueError, match="epochs"):
        GlueSettings(epochs=0)
    with pytest.raises(GlueError, match="max_train_examples"):
        GlueSettings(max_train_examples=-3)
    with pytest.raises(GlueError, match="unknown glue setting.*epoch"):
        GlueSettings.from_dict({"epoch": 2})
    assert GlueSettings.from_dict({"lr": 1e-3}).lr == 1e-3


# ---------------------------------------------------------------------------------------------
# Fine-tuning on real MRPC


@needs_glue
def test_finetune_keeps_precision_plan_and_scores_against_baseline(model_dir):
    trained = load_trained(model_dir)
    planned = {n: f for n, f in trained.formats.items() if f != "fp"}
    n_quant = sum(isinstance(m, QuantLinear) for m in trained.model.modules())
    assert n_quant == 28 and set(planned.values()) == {"absmean"}
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    train, dev = glue.load_glue("mrpc", "train", GLUE_DIR), glue.load_glue("mrpc", "dev", GLUE_DIR)
    steps = []
    result = glue.finetune(trained, "mrpc", GlueSettings(**{**QUICK, "max_dev_examples": None}),
                           train, dev, on_step=lambda s, loss: steps.append(loss))
    assert (result.n_train, result.n_dev, result.steps) == (192, 408, 6) and len(steps) == 6
    assert all(math.isfinite(x) for x in steps)
    assert set(result.metrics) == set(result.baseline) == {"f1", "accuracy"}
    assert all(0.0 <= v <= 1.0 for v in [*result.metrics.values(), *result.baseline.values()])
    assert round(result.baseline["f1"], 3) == 0.812 and result.majority_label == 1
    assert result.metrics == glue.glue_metrics("mrpc", dev.labels, result.predictions)
    # Precision plan kept: the same QuantLinear modules and formats, still ternary codes.
    lm = result.model.lm
    assert lm is trained.model and result.formats_kept and result.quant_linears == n_quant
    assert glue.layer_formats(convert(lm)) == planned and ternary_codes_ok(lm)
    assert type(result.model.classifier) is torch.nn.Linear  # the new head stays fp
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.") for k in changed)  # the LM itself was fine-tuned
    json.dumps(result.to_json())


@needs_glue
def test_finetune_and_log_creates_child_run(model_dir, tmp_path, monkeypatch):
    from ternarylm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = tracking.ensure_experiment("glue-test", uri)
    parent = tracking.start_run(uri, exp, "tiny-pretrain", {tracking.TRIAL_KEY_TAG: "k"})
    tracking.log_artifact(uri, parent, model_dir, ARTIFACT_PATH)
    tracking.end_run(uri, parent)

    settings = GlueSettings(**QUICK, pooling="last")
    out = glue.finetune_and_log(parent, "mrpc", settings, GLUE_DIR)
    c = tracking.client(uri)
    child = c.get_run(out["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.experiment_id == exp and child.info.status == "FINISHED"
    assert child.data.tags[glue.GLUE_TASK_TAG] == "mrpc"
    assert tracking.TRIAL_KEY_TAG not in child.data.tags  # trials are found by that tag
    m = child.data.metrics
    for key in ("dev/f1", "dev/accuracy", "baseline/f1", "baseline/accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["delta/f1"] == pytest.approx(m["dev/f1"] - m["baseline/f1"])
    assert (m["n_train"], m["n_dev"], m["quant_linears"]) == (192, 128, 28)
    assert len(tracking.metric_history(uri, out["run_id"], "train/loss")) == 6
    assert child.data.params["glue.pooling"] == "last"
    assert child.data.params["plan"] == "all_ternary"
    assert child.data.tags["ternarylm.glue.formats_kept"] == "True"
    assert out["metrics"]["f1"] == m["dev/f1"] and out["baseline"]["f1"] == m["baseline/f1"]
    assert not out["skipped"] and out["source"] == parent
    # Same settings again: the finished child is reused, nothing is trained or created.
    again = glue.finetune_and_log(parent, "mrpc", settings, GLUE_DIR)
    assert again["skipped"] and again["run_id"] == out["run_id"]
    assert again["metrics"] == out["metrics"] and again["baseline"] == out["baseline"]
    assert set(again) == set(out) and again["steps"] == out["steps"] == 6
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1
    # Bad data fails before any run is created.
    with pytest.raises(GlueDataError, match="SST-2/train.tsv"):
        glue.finetune_and_log(parent, "sst2", settings, tmp_path)
    assert len(c.search_runs([exp])) == 2
    with pytest.raises(GlueError, match="not found"):
        glue.finetune_and_log("0" * 32, "mrpc", settings, GLUE_DIR)


@needs_glue
def test_cli_glue_prints_json_line(model_dir, tmp_path, capsys):
    from ternarylm.cli import main

    rc = main(["glue", "--run", str(model_dir), "--task", "MRPC", "--data-dir", str(GLUE_DIR),
               "--epochs", "1", "--max-train-examples", "64", "--max-dev-examples", "64",
               "--batch-size", "32", "--pooling", "mean", "--lr", "1e-4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["task"] == "mrpc" and result["run_id"] is None
    assert (result["n_train"], result["n_dev"], result["steps"]) == (64, 64, 2)
    assert set(result["metrics"]) == {"f1", "accuracy"} and result["formats_kept"]
    rc = main(["glue", "--run", str(model_dir), "--task", "mrpc", "--data-dir",
               str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "missing") in err and "Traceback" not in err
    rc = main(["glue", "--run", str(model_dir), "--task", "qnli", "--data-dir", str(GLUE_DIR)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown GLUE task 'qnli'; choose one of mrpc, sst2, cola" in err
