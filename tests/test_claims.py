"""The paper-claims report: each verdict rule on constructed results, the report's contents, the
laptop preset's grid by dry run, bad input, and one real footprint measurement."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ternarylm import claims
from ternarylm.claims import (CANNOT_TELL, CLAIMS, CONTRADICTS, SUPPORTS, ClaimsConfig, Footprint,
                              MrpcEvidence, Scale)
from ternarylm.errors import UserError
from ternarylm.glue import glue_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "studies" / "configs"
LAPTOP = Scale("micro", "char", "/data/tinystories_sample.txt", None, 300_000)
PAPER = Scale("paper-132m", "hf:bert-base-uncased", "roneneldan/TinyStories", None, 10**9)


def row(plan: str, scheme: str, seed: int, size: str = "micro", status: str = "FINISHED",
        **metrics) -> dict:
    return {"size": size, "plan": plan, "scheme": "-" if plan == "fp" else scheme, "seed": seed,
            "status": status, "run_id": f"run-{plan}-{scheme}-{seed}", **metrics}


def rows_of(plan: str, scheme: str, key: str, values: list[float], **kw) -> list[dict]:
    return [row(plan, scheme, seed, **{key: v}, **kw) for seed, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# Claim 1


def quality_rows(ternary_ppl: list[float]) -> list[dict]:
    rows = [row("all_ternary", "learned", s, val_ppl=p, val_bpb=1.5 + s / 100)
            for s, p in enumerate(ternary_ppl)]
    return rows + [row("fp", "learned", s, val_ppl=50.0 + s, val_bpb=1.4) for s in range(3)]


def test_claim1_verdicts():
    near = claims.quality_finding(quality_rows([58.3, 58.5, 58.45]), PAPER)
    assert near.verdict == SUPPORTS
    assert "FP: ppl 51" in near.figure and "bpb" in near.figure and "paper-132m" in near.figure
    assert claims.quality_finding(quality_rows([80.0, 81.0, 79.5]), PAPER).verdict == CONTRADICTS
    # The same numbers at a laptop's scale are not comparable with the paper's perplexity.
    laptop = claims.quality_finding(quality_rows([58.3, 58.5, 58.45]), LAPTOP)
    assert laptop.verdict == CANNOT_TELL and "not the paper's" in laptop.reason
    assert claims.quality_finding(quality_rows([58.4]), PAPER).verdict == CANNOT_TELL
    failed = quality_rows([58.3, 58.5, 58.45])
    failed[1]["status"] = failed[2]["status"] = "FAILED"
    assert claims.quality_finding(failed, PAPER).verdict == CANNOT_TELL


def test_claim1_interval_is_a_t_interval():
    interval = claims.seed_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.std == 1.0 and interval.n == 3
    assert interval.hi - interval.mean == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Claim 2


def mrpc_labels() -> list[int]:
    return [1] * 279 + [0] * 129  # MRPC dev: 279 of 408 pairs are paraphrases


def test_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert float(claims._f1(y, p)) == pytest.approx(glue_metrics("mrpc", y, p)["f1"])
    baseline = claims.mrpc_scores(MrpcEvidence("m", mrpc_labels(), [1] * 408, 1))
    assert baseline["baseline_f1"] == pytest.approx(0.812, abs=5e-4)


def test_claim2_verdicts():
    labels = mrpc_labels()
    good = MrpcEvidence("good", labels, labels[:300] + [1 - y for y in labels[300:340]]
                        + labels[340:], 1)
    finding = claims.mrpc_finding(good, LAPTOP)
    assert finding.verdict == SUPPORTS
    assert finding.values["ternary"]["f1_margin_ci"][0] > 0
    assert "majority baseline F1 81.2" in finding.figure
    majority = MrpcEvidence("always yes", labels, [1] * len(labels), 1)
    assert claims.mrpc_finding(majority, PAPER).verdict == CONTRADICTS
    assert claims.mrpc_finding(majority, LAPTOP).verdict == CANNOT_TELL
    # Above the baseline by a margin the dev set cannot resolve: one flipped negative.
    barely = MrpcEvidence("barely", labels, [1] * 279 + [0] + [1] * 128, 1)
    assert claims.mrpc_finding(barely, LAPTOP).verdict == CANNOT_TELL
    assert claims.mrpc_finding(None, LAPTOP).verdict == CANNOT_TELL


# ---------------------------------------------------------------------------------------------
# Claim 3


def footprint(memory_ratio: float, packed_ms: list[float], size: str = "paper-132m") -> Footprint:
    fp32 = 528 * 2**20
    return Footprint(size, size, fp32, fp32 // 6, fp32, int(fp32 / memory_ratio),
                     [1.0] * len(packed_ms), packed_ms, 1)


def test_claim3_verdicts():
    assert claims.footprint_finding(footprint(4.0, [0.5] * 32)).verdict == SUPPORTS
    assert claims.footprint_finding(footprint(2.0, [0.5] * 32)).verdict == CONTRADICTS
    assert claims.footprint_finding(footprint(4.0, [2.0] * 32)).verdict == CONTRADICTS
    noisy = claims.footprint_finding(footprint(4.0, [0.9, 1.3] * 16))
    assert noisy.verdict == CANNOT_TELL
    lo, hi = noisy.values["random_init"]["latency_ratio_ci"]
    assert lo <= 1.1 < hi
    unmeasured = footprint(4.0, [0.5] * 32)
    unmeasured.packed_rss_bytes = 0  # loading added nothing the allocator did not already hold
    finding = claims.footprint_finding(unmeasured)
    assert finding.verdict == CANNOT_TELL and "(n/a)" in finding.figure
    # Only paper-132m decides: a smaller size or a small trained model cannot.
    small = footprint(4.0, [0.5] * 32, size="micro")
    assert claims.footprint_finding(small).verdict == CANNOT_TELL
    only_trained = claims.footprint_finding(None, small)
    assert only_trained.verdict == CANNOT_TELL and "micro" in only_trained.figure


# ---------------------------------------------------------------------------------------------
# Claim 4


def overfit_rows(fp: list[float], ternary: list[float]) -> list[dict]:
    return (rows_of("fp", "learned", "train_val_ratio", fp)
            + rows_of("all_ternary", "learned", "train_val_ratio", ternary))


def test_claim4_verdicts():
    supports = claims.overfit_finding(overfit_rows([1.6, 1.7, 1.65], [1.05, 1.06, 1.04]), LAPTOP)
    assert supports.verdict == SUPPORTS
    assert supports.values["learned"]["p_value"] < 0.05 and "Welch p=" in supports.figure
    assert claims.overfit_finding(overfit_rows([1.6, 1.7, 1.65], [1.8, 1.9, 1.85]),
                                  LAPTOP).verdict == CONTRADICTS
    no_overfit = claims.overfit_finding(overfit_rows([1.05, 1.06, 1.04], [1.0, 1.01, 1.0]), LAPTOP)
    assert no_overfit.verdict == CANNOT_TELL and "overfits at" in no_overfit.reason
    noisy = claims.overfit_finding(overfit_rows([1.3, 2.0, 1.6], [1.2, 1.9, 1.5]), LAPTOP)
    assert noisy.verdict == CANNOT_TELL and noisy.values["learned"]["p_value"] > 0.05
    assert claims.overfit_finding(overfit_rows([1.6], [1.05]), LAPTOP).verdict == CANNOT_TELL


# ---------------------------------------------------------------------------------------------
# Claim 5


def blocks(middle: float, boundary: float, n: int = 12) -> dict[int, float]:
    return {b: middle if b in claims.MIDDLE_BLOCKS else boundary for b in range(n)}


def depth_rows(scheme: str, pairs: list[tuple[float, float]],
               size: str = "deep-nano") -> list[dict]:
    return [row("all_ternary", scheme, s, size=size, blocks=blocks(m, b))
            for s, (m, b) in enumerate(pairs)]


def test_claim5_verdicts():
    paper_like = depth_rows("learned", [(0.61, 0.50), (0.60, 0.51), (0.62, 0.50)])
    flat = depth_rows("absmean", [(0.35, 0.35), (0.351, 0.35), (0.349, 0.35)])
    finding = claims.depth_finding(paper_like + flat, LAPTOP)
    assert finding.verdict == SUPPORTS  # decided on the paper's scheme, learned
    schemes = finding.values["schemes"]
    assert schemes["learned"]["verdict"] == SUPPORTS
    assert schemes["absmean"]["verdict"] == CONTRADICTS
    assert schemes["learned"]["gap"]["mean"] == pytest.approx(0.1067, abs=1e-3)
    assert finding.values["scheme_anova_p"] < 0.05 and "ANOVA" in finding.figure
    assert claims.depth_finding(flat, LAPTOP).verdict == CONTRADICTS
    wide = depth_rows("learned", [(0.45, 0.50), (0.60, 0.50), (0.70, 0.50)])
    assert claims.depth_finding(wide, LAPTOP).verdict == CANNOT_TELL
    shallow = depth_rows("learned", [(0.61, 0.50)] * 3, size="tiny")  # 4 blocks, not 12
    assert claims.depth_finding(shallow, LAPTOP).verdict == CANNOT_TELL
    assert claims.middle_gap({str(b): z for b, z in blocks(0.6, 0.5).items()}) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Report


def test_report_holds_every_claim_column_and_rule():
    labels = mrpc_labels()
    findings = [claims.quality_finding(quality_rows([3.1, 3.2, 3.15]), LAPTOP),
                claims.mrpc_finding(MrpcEvidence("m", labels, labels, 1), LAPTOP),
                claims.footprint_finding(footprint(4.0, [0.5] * 32)),
                claims.overfit_finding(overfit_rows([1.6, 1.7, 1.65], [1.8, 1.9, 1.85]), LAPTOP),
                claims.depth_finding(depth_rows("learned", [(0.45, 0.5), (0.6, 0.5), (0.7, 0.5)]),
                                     LAPTOP)]
    markdown, data = claims.report(findings, "test")
    lines = markdown.splitlines()
    header = lines.index("| claim | paper's figure | figure here (interval, scale) | verdict | "
                         "how measured |")
    table = lines[header + 2:header + 7]
    verdicts = [CANNOT_TELL, SUPPORTS, SUPPORTS, CONTRADICTS, CANNOT_TELL]
    for c, line, verdict in zip(CLAIMS.values(), table, verdicts):
        assert line.startswith(f"| {c.id}. ") and f"**{verdict}**" in line
        assert line.count(" | ") == 4  # five cells: no stray pipe from a figure
    for c in CLAIMS.values():
        assert f"{c.id}. {c.title}: {c.rule}" in markdown
    assert "58.42" in markdown and "## Verdict rules" in markdown
    assert [c["verdict"] for c in data["claims"]] == verdicts
    assert set(data["rules"]) == {"1", "2", "3", "4", "5"} and data["columns"][3] == "verdict"
    json.dumps(data)  # JSON-ready


def test_rules_text_names_the_thresholds_the_code_uses():
    assert str(claims.OVERFIT_RATIO) in CLAIMS[4].rule and str(claims.ALPHA) in CLAIMS[4].rule
    assert f"{claims.PAPER_MIN_GAP:g}" in CLAIMS[5].rule
    assert f"{1 + claims.LATENCY_TOLERANCE:g}" in CLAIMS[3].rule
    assert str(claims.PAPER_MEMORY_RATIO) in CLAIMS[3].rule
    assert all(v in c.rule for c in CLAIMS.values() for v in (SUPPORTS, CANNOT_TELL))


# ---------------------------------------------------------------------------------------------
# Presets, dry run and bad input


@pytest.fixture(scope="module")
def paper_claims():
    sys.path.insert(0, str(REPO / "studies"))
    try:
        yield importlib.import_module("paper_claims")
    finally:
        sys.path.remove(str(REPO / "studies"))


def expected_trials(study: dict) -> int:
    per_seed = sum(1 if plan == "fp" else len(study["schemes"]) for plan in study["plans"])
    return per_seed * len(study["seeds"])


def test_laptop_preset_dry_run(paper_claims, capsys):
    assert paper_claims.main(["--preset", "laptop", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    raw = yaml.safe_load((CONFIGS / "claims_laptop.yaml").read_text())
    batch = raw["trial"]["train"]["micro_batch"] * raw["trial"]["seq_len"]
    assert set(out["studies"]) == {"quality", "overfit", "depth"}
    for key, got in out["studies"].items():
        want = raw[key]
        assert got["trials"] == expected_trials(want) == len(got["rows"])
        assert {r["size"] for r in got["rows"]} == set(want["sizes"])
        assert sorted({r["seed"] for r in got["rows"]}) == want["seeds"] == [0, 1, 2]
        assert all(0 <= r["tokens"] - want["tokens"] < batch for r in got["rows"])
    assert out["trials"] == 21
    assert out["tokens"] == sum(s["tokens"] for s in out["studies"].values())
    # A realistic 30-minute budget on 2 cores (~5k tokens/s per core, plus per-trial overhead).
    assert out["tokens"] <= 5_000_000
    cfg = paper_claims.load_claims(argparse.Namespace(preset="laptop", config=None, data=None,
                                                      name=None))
    overfit = cfg.studies["overfit"].trials()[0]
    epochs = overfit.train.steps * overfit.global_batch_tokens / overfit.data.max_train_bytes
    assert epochs >= 5  # FP must see its small corpus several times to overfit
    depth = cfg.studies["depth"]
    assert all(claims.model_config(s).n_layers == claims.PAPER_DEPTH for s in depth.sizes)


def test_paper_preset_is_the_papers_scale(paper_claims, capsys):
    assert paper_claims.main(["--preset", "paper", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["gpu_hours"] > 1  # and the learned trials depth shares with quality count once:
    assert out["trials"] < sum(s["trials"] for s in out["studies"].values())
    cfg = ClaimsConfig.from_yaml(CONFIGS / "claims_paper.yaml")
    quality = cfg.studies["quality"]
    assert Scale.of(quality).is_paper() and quality.seeds == [0, 1, 2]
    assert all(t.use_gpu for s in cfg.studies.values() for t in s.trials())


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope", "--dry-run"], "unknown preset 'nope'"),
    (["--dry-run", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_are_one_line(paper_claims, capsys, argv, message):
    try:
        rc = paper_claims.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["overfit"].update(plans=["all_ternary"]), "claims.overfit.plans must include fp"),
    (lambda c: c["depth"].update(sizes=["no-such-size"]), "no-such-size"),
    (lambda c: c.update(colour="red"), "unknown setting(s) in claims: colour"),
    (lambda c: c["glue"].update(max_dev_examples=100), "max_dev_examples must be unset"),
    (lambda c: c.update(decode_tokens=0), "decode_tokens must be a positive integer"),
])
def test_bad_config_is_one_line(paper_claims, capsys, tmp_path, edit, message):
    raw = yaml.safe_load((CONFIGS / "claims_laptop.yaml").read_text())
    edit(raw)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert paper_claims.main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        ClaimsConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------
# Gathering the evidence from trained models (trained-model directories stand in for runs)


SHARED_GLUE = Path(__import__("os").environ.get("TERNARYLM_SHARED_DATA",
                                                REPO.parent / "shared" / "data")) / "glue"


def trained_dir(root: Path, plan: str) -> Path:
    import torch

    from ternarylm.artifacts import save_trained
    from ternarylm.config import TrialConfig
    from ternarylm.data import build_tokenizer, eos_id
    from ternarylm.model import TernaryLM
    from ternarylm.plans import apply_plan

    tok = build_tokenizer("char", [])
    trial = TrialConfig(size="pico", seq_len=64, plan=plan, scheme="learned",
                        data={"source": "stories.txt", "tokenizer": "char"})
    torch.manual_seed(0)
    model = TernaryLM(trial.model_config(vocab_size=tok.get_vocab_size()))
    formats = apply_plan(model, trial.plan, trial.scheme, model.cfg.n_layers)
    return save_trained(root / plan, model, trial, formats, tok, eos_id(tok))


@pytest.mark.skipif(not (SHARED_GLUE / "MRPC" / "dev.tsv").is_file(),
                    reason="MRPC not found in the shared data")
def test_evidence_from_trained_models_and_report_on_mlflow(tmp_path, mlflow_uri, one_torch_thread):
    from ternarylm import tracking

    raw = yaml.safe_load((CONFIGS / "claims_laptop.yaml").read_text())
    raw |= {"footprint_size": "pico", "decode_tokens": 4, "glue_data_dir": str(SHARED_GLUE),
            "glue": {"epochs": 1, "max_train_examples": 64, "batch_size": 32, "device": "cpu"}}
    cfg = ClaimsConfig.from_dict(raw)
    fp_dir, ternary_dir = trained_dir(tmp_path, "fp"), trained_dir(tmp_path, "all_ternary")
    quality = [row("fp", "learned", 0, size="pico", val_ppl=3.0, val_bpb=1.5),
               row("all_ternary", "learned", 0, size="pico", val_ppl=3.2, val_bpb=1.6)]
    quality[0]["run_id"], quality[1]["run_id"] = str(fp_dir), str(ternary_dir)
    rows = {"quality": quality, "overfit": overfit_rows([1.6, 1.7, 1.65], [1.05, 1.06, 1.04]),
            "depth": depth_rows("learned", [(0.61, 0.50), (0.60, 0.51), (0.62, 0.50)])}
    findings = claims.findings_from(cfg, rows, log=lambda line: None)
    assert [f.claim for f in findings] == [1, 2, 3, 4, 5]
    mrpc = findings[1].values
    assert mrpc["ternary"]["n_dev"] == 408 and mrpc["FP"]["model"] == "pico -/fp s0"
    assert mrpc["ternary"]["baseline_f1"] == pytest.approx(0.812, abs=5e-4)
    memory = findings[2]
    assert memory.verdict == CANNOT_TELL  # pico stands in for paper-132m here
    assert set(memory.values) == {"random_init", "trained"}
    trained = memory.values["trained"]
    assert trained["fp32_file_bytes"] > 2 * trained["packed_file_bytes"]
    assert trained["model"] == "trained pico (learned)" and trained["fp32_ms_per_token"] > 0
    assert [f.verdict for f in findings[3:]] == [SUPPORTS, SUPPORTS]

    markdown, data = claims.report(findings, "test")
    exp = tracking.ensure_experiment("ternarylm", mlflow_uri)
    run_id = tracking.start_run(mlflow_uri, exp, "study-test", {})
    claims.log_report(mlflow_uri, [run_id], markdown, data)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="claims",
                                                     tracking_uri=mlflow_uri))
    assert (local / "claims.md").read_text() == markdown
    assert json.loads((local / "claims.json").read_text())["claims"][2]["verdict"] == CANNOT_TELL
