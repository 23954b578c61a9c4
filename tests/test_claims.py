"""The paper-claims report: each verdict rule on constructed results, the report's contents, the
laptop preset's grid by dry run, bad input, and one real footprint measurement."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats

import claims  # studies/claims.py: the study's own module (pytest's pythonpath has studies/)
from claims import CLAIMS, ClaimsConfig, Footprint, GlueEvidence, Scale
from ternarylm.analysis import verdicts
from ternarylm.analysis.verdicts import CANNOT_TELL, CONTRADICTS, SUPPORTS
from ternarylm.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "studies" / "configs"
LAPTOP = Scale("micro", "char", "/data/tinystories_sample.txt", None, 300_000)
PAPER = Scale("paper-132m", "hf:bert-base-uncased", "roneneldan/TinyStories", None,
              claims.PAPER_TOKENS, claims.PAPER_STORIES)


def row(plan: str, scheme: str, seed: int, size: str = "micro", status: str = "FINISHED",
        **metrics) -> dict:
    return {"size": size, "plan": plan, "scheme": "-" if plan == "fp" else scheme, "seed": seed,
            "status": status, "run_id": f"run-{plan}-{scheme}-{seed}", **metrics}


def rows_of(plan: str, scheme: str, key: str, values: list[float], **kw) -> list[dict]:
    return [row(plan, scheme, seed, **{key: v}, **kw) for seed, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# The tests' building blocks


def test_tost_and_one_sided_tests_match_scipy():
    values = [58.0, 58.6, 58.3, 58.9]
    test = verdicts.band_test(values, 55.5, 61.3, "ppl")
    lo = stats.ttest_1samp(values, 55.5, alternative="greater").pvalue
    hi = stats.ttest_1samp(values, 61.3, alternative="less").pvalue
    assert test.p_supports == pytest.approx(max(lo, hi)) and test.outcome == SUPPORTS
    # No spread: the mean is known exactly, so the sign of the difference decides.
    assert verdicts.above_test([0.3] * 3, 0.2, "x").outcome == SUPPORTS
    assert verdicts.above_test([0.1] * 3, 0.2, "x").outcome == CONTRADICTS
    assert verdicts.above_test([0.3], 0.2, "x").outcome == CANNOT_TELL  # one seed: no test


def test_seeds_needed_is_a_t_test_power_calculation():
    # One-sample one-sided t test, effect = 1 sd, alpha 0.05, power 0.8: n = 8 (the usual
    # tables; n = 7 gives 0.77).
    assert verdicts.seeds_needed([1.0], 1.0) == 8
    # Two-sample, d = 1 per group: 14 (G*Power: 14 for one-sided alpha 0.05, power 0.8).
    assert verdicts.seeds_needed([1.0], 1.0, two_sample=True) == 14
    assert verdicts.seeds_needed([0.0], 1.0) is None  # an effect on the bound: no seeds decide


# ---------------------------------------------------------------------------------------------
# Claim 1


def quality_rows(smoothed: list[float], plain: list[float] | None = None) -> list[dict]:
    plain = plain or [p * 0.8 for p in smoothed]
    rows = [row("all_ternary", "learned", s, val_ppl=q, val_loss_smoothed=math.log(p),
                val_bpb=1.5 + s / 100) for s, (p, q) in enumerate(zip(smoothed, plain))]
    return rows + [row("fp", "learned", s, val_ppl=50.0 + s, val_loss_smoothed=math.log(60 + s),
                       val_bpb=1.4) for s in range(3)]


def test_claim1_tost_on_the_smoothed_perplexity():
    near = claims.quality_finding(quality_rows([58.3, 58.5, 58.45]), PAPER)
    assert near.verdict == SUPPORTS and near.values["matches_paper"] == ["smoothed"]
    assert "FP: ppl smoothed 61" in near.figure and "plain 51" in near.figure
    assert claims.quality_finding(quality_rows([80.0, 81.0, 79.5]), PAPER).verdict == CONTRADICTS
    # The same numbers at a laptop's scale, or at the paper's model with another budget, are
    # not comparable with the paper's perplexity.
    for scale in (LAPTOP, dataclasses.replace(PAPER, tokens=10**9)):
        other = claims.quality_finding(quality_rows([58.3, 58.5, 58.45]), scale)
        assert other.verdict == CANNOT_TELL and "not the paper's" in other.reason
    assert claims.quality_finding(quality_rows([58.4]), PAPER).verdict == CANNOT_TELL
    failed = quality_rows([58.3, 58.5, 58.45])
    failed[1]["status"] = failed[2]["status"] = "FAILED"
    assert claims.quality_finding(failed, PAPER).verdict == CANNOT_TELL


def test_claim1_two_noisy_seeds_cannot_tell_and_say_how_many_would():
    # Adversarial: the old tolerance was max(t half-width, 5%), so noise widened it and two
    # seeds 10 apart "supported" the paper.
    finding = claims.quality_finding(quality_rows([53.0, 63.0]), PAPER)
    assert finding.verdict == CANNOT_TELL
    assert finding.power.toward == SUPPORTS and finding.power.seeds > 2
    assert f"{finding.power.seeds} seeds (have 2)" in claims.to_decide(finding)


def test_claim1_interval_is_a_t_interval():
    interval = verdicts.seed_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.std == 1.0 and interval.n == 3
    assert interval.hi - interval.mean == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Claim 2


def mrpc_labels() -> list[int]:
    return [1] * 279 + [0] * 129  # MRPC dev: 279 of 408 pairs are paraphrases


def scoring(labels: list[int], target_f1: float) -> list[int]:
    """MRPC predictions (k false positives, m false negatives) whose F1 is nearest target_f1."""
    def f1(k: int, m: int) -> float:
        return 2 * (279 - m) / (2 * (279 - m) + k + m)

    k, m = min(((k, m) for k in range(130) for m in range(80)),
               key=lambda km: abs(f1(*km) - target_f1))
    return [0] * m + [1] * (279 - m) + [1] * k + [0] * (129 - k)


def glue_runs(f1s: list[float], task: str = "mrpc") -> list[GlueEvidence]:
    labels = mrpc_labels()
    return [GlueEvidence(task, f"s{i}", labels, scoring(labels, f1), 1)
            for i, f1 in enumerate(f1s)]


def test_f1_of_the_majority_baseline():
    labels = mrpc_labels()
    scores = claims.glue_scores(GlueEvidence("mrpc", "m", labels, [1] * 408, 1))
    assert scores["baseline"] == pytest.approx(81.2, abs=0.05) == scores["score"]


def test_claim2_exact_reproduction_does_not_contradict():
    # Adversarial: a model scoring the paper's 82.46 on dev had a paired-bootstrap margin over
    # the baseline touching 0, which read as contradicts at the paper's scale.
    one = claims.glue_finding(glue_runs([0.8246]), PAPER)
    assert one.verdict == CANNOT_TELL  # one fine-tune: no spread to test with
    noisy = claims.glue_finding(glue_runs([0.8246, 0.8146, 0.8346]), PAPER)
    assert noisy.verdict == CANNOT_TELL and noisy.power.toward == SUPPORTS
    tight = claims.glue_finding(glue_runs([0.8246, 0.8240, 0.8252, 0.8246]), PAPER)
    assert tight.verdict == SUPPORTS
    assert tight.values["mrpc"]["beats_baseline"]["outcome"] == SUPPORTS


def test_claim2_majority_answer_contradicts_and_laptop_cannot_tell():
    majority = glue_runs([0.812] * 3)
    assert claims.glue_finding(majority, PAPER).verdict == CONTRADICTS
    laptop = claims.glue_finding(majority, LAPTOP)
    assert laptop.verdict == CANNOT_TELL
    assert laptop.values["mrpc"]["beats_baseline"]["outcome"] == CONTRADICTS
    assert "majority baseline 81.2" in laptop.figure and "not run: sst2, cola" in laptop.figure
    assert claims.glue_finding([], LAPTOP).verdict == CANNOT_TELL


def test_claim2_any_task_contradicting_contradicts():
    labels = [1] * 444 + [0] * 428  # SST-2 dev
    good = [GlueEvidence("sst2", f"s{i}", labels, labels[:-k] + [1 - y for y in labels[-k:]], 1)
            for i, k in enumerate((95, 96, 97))]  # accuracy 89.0, 89.0, 88.9
    finding = claims.glue_finding(glue_runs([0.8246, 0.8240, 0.8252]) + good, PAPER)
    assert finding.values["sst2"]["outcome"] == SUPPORTS
    bad = [dataclasses.replace(e, predictions=[1] * len(labels)) for e in good]
    both = claims.glue_finding(glue_runs([0.8246, 0.8240, 0.8252]) + bad, PAPER)
    assert both.values["sst2"]["baseline"] == pytest.approx(50.9, abs=0.05)
    assert both.verdict == CONTRADICTS


# ---------------------------------------------------------------------------------------------
# Claim 3


def footprint(memory_ratio: float, packed_ms: list[float], size: str = "paper-132m",
              spread: float = 0.0) -> Footprint:
    fp32 = 900 * 2**20
    packed = int(fp32 / memory_ratio)
    return Footprint(size, size, fp32, fp32 // 6, [fp32, fp32],
                     [int(packed * (1 - spread)), int(packed * (1 + spread))],
                     [1.0] * len(packed_ms), packed_ms, 1)


def test_claim3_verdicts():
    assert claims.footprint_finding(footprint(4.0, [0.5] * 32)).verdict == SUPPORTS
    # Like for like, the runtime's own memory can keep the ratio below 2.4: contradicts.
    assert claims.footprint_finding(footprint(2.0, [0.5] * 32)).verdict == CONTRADICTS
    assert claims.footprint_finding(footprint(4.0, [2.0] * 32)).verdict == CONTRADICTS
    straddle = claims.footprint_finding(footprint(2.4, [0.5] * 32, spread=0.05))
    assert straddle.verdict == CANNOT_TELL and "peak-memory" in claims.to_decide(straddle)
    noisy = claims.footprint_finding(footprint(4.0, [0.8, 1.3] * 16))
    assert noisy.verdict == CANNOT_TELL and "decode_tokens" in claims.to_decide(noisy)
    lo, hi = noisy.values["random_init"]["latency_ratio_ci"]
    assert lo <= 1.1 < hi
    assert "BERT-Base" in noisy.figure  # the paper's comparison, for what it is
    small = footprint(4.0, [0.5] * 32, size="micro")
    assert claims.footprint_finding(small).verdict == CANNOT_TELL
    only_trained = claims.footprint_finding(None, small)
    assert only_trained.verdict == CANNOT_TELL and "micro" in only_trained.figure


# ---------------------------------------------------------------------------------------------
# Claim 4


def overfit_rows(fp: list[float], ternary: list[float], fp_loss: list[float] | None = None,
                 ternary_loss: list[float] | None = None) -> list[dict]:
    fp_loss = fp_loss or [2.0 + i / 100 for i in range(len(fp))]
    ternary_loss = ternary_loss or [1.9 + i / 100 for i in range(len(ternary))]
    return ([row("fp", "learned", s, train_val_ratio=r, val_loss=v)
             for s, (r, v) in enumerate(zip(fp, fp_loss))]
            + [row("all_ternary", "learned", s, train_val_ratio=r, val_loss=v)
               for s, (r, v) in enumerate(zip(ternary, ternary_loss))])


def test_claim4_verdicts():
    supports = claims.overfit_finding(overfit_rows([3.4, 3.6, 3.5], [1.05, 1.06, 1.04]), LAPTOP)
    assert supports.verdict == SUPPORTS
    assert supports.values["tests"]["hedges_g"] < -10
    assert claims.overfit_finding(overfit_rows([3.4, 3.6, 3.5], [3.8, 3.9, 3.85]),
                                  LAPTOP).verdict == CONTRADICTS
    no_overfit = claims.overfit_finding(overfit_rows([1.6, 1.7, 1.68], [1.0, 1.01, 1.0]), LAPTOP)
    assert no_overfit.verdict == CANNOT_TELL and "more epochs" in claims.to_decide(no_overfit)
    assert claims.overfit_finding(overfit_rows([3.6], [1.05]), LAPTOP).verdict == CANNOT_TELL


def test_claim4_underfitting_ternary_contradicts():
    # Adversarial: a lower ratio alone used to support, and an underfitting model has one.
    finding = claims.overfit_finding(overfit_rows([3.4, 3.6, 3.5], [1.05, 1.06, 1.04],
                                                  [2.0, 2.02, 2.01], [3.0, 3.05, 2.98]), LAPTOP)
    assert finding.verdict == CONTRADICTS
    assert finding.values["tests"]["val_loss"]["outcome"] == CONTRADICTS


def test_claim4_point_means_that_flip_cannot_tell():
    # Adversarial: ternary's mean ratio a hair above FP's used to contradict on point means.
    finding = claims.overfit_finding(overfit_rows([2.6, 3.4, 3.0], [2.7, 3.3, 3.02]), LAPTOP)
    assert finding.verdict == CANNOT_TELL
    assert finding.power is not None and "seeds" in claims.to_decide(finding)


# ---------------------------------------------------------------------------------------------
# Claim 5


def blocks(middle: float, boundary: float, n: int = 12) -> dict[int, float]:
    return {b: middle if b in claims.MIDDLE_BLOCKS else boundary for b in range(n)}


def depth_rows(scheme: str, pairs: list[tuple[float, float]], size: str = "deep-nano",
               tokens_per_param: float = 10.0) -> list[dict]:
    return [row("all_ternary", scheme, s, size=size, blocks=blocks(m, b), N=1e6,
                D=tokens_per_param * 1e6, blocks_initial=blocks(0.31, 0.31), zeros_lsq_init=0.58)
            for s, (m, b) in enumerate(pairs)]


def test_claim5_verdicts():
    paper_like = depth_rows("learned", [(0.61, 0.50), (0.60, 0.51), (0.62, 0.50)])
    flat = depth_rows("absmean", [(0.35, 0.35), (0.351, 0.35), (0.349, 0.35)])
    finding = claims.depth_finding(paper_like + flat, LAPTOP)
    assert finding.verdict == SUPPORTS  # decided on the paper's scheme, learned
    schemes = finding.values["schemes"]
    assert schemes["learned"]["outcome"] == SUPPORTS
    assert schemes["absmean"]["outcome"] == CONTRADICTS
    assert schemes["learned"]["gap"]["mean"] == pytest.approx(0.1067, abs=1e-3)
    assert finding.values["scheme_anova_p"] < 0.05 and "ANOVA" in finding.figure
    assert "zeros at init 31% -> final" in finding.figure and "LSQ's init would give 58%" \
        in finding.figure
    assert claims.depth_finding(flat, LAPTOP).verdict == CONTRADICTS
    shallow = depth_rows("learned", [(0.61, 0.50)] * 3, size="tiny")  # 4 blocks, not 12
    assert claims.depth_finding(shallow, LAPTOP).verdict == CANNOT_TELL
    assert claims.middle_gap({str(b): z for b, z in blocks(0.6, 0.5).items()}) == pytest.approx(0.1)


def test_claim5_levels_decide_at_the_papers_scale():
    # The paper's gap at other levels: fine below the paper's scale, contradicts at it.
    shifted = depth_rows("learned", [(0.41, 0.30), (0.40, 0.31), (0.42, 0.30)],
                         size="paper-132m")
    assert claims.depth_finding(shifted, LAPTOP).verdict == SUPPORTS
    assert claims.depth_finding(shifted, PAPER).verdict == CONTRADICTS


def test_claim5_gaps_below_the_papers_smallest_never_support():
    # Adversarial: every seed's gap below 0.05, yet the old interval [0.015, 0.059] lay above 0
    # and reached 0.05, which supported.
    gaps = [0.01, 0.03, 0.049, 0.049, 0.049]
    finding = claims.depth_finding(depth_rows("learned", [(0.5 + g, 0.5) for g in gaps]), LAPTOP)
    assert finding.verdict == CANNOT_TELL
    assert finding.values["schemes"]["learned"]["below_paper_min"] == 5
    assert finding.power.toward == CONTRADICTS


def test_claim5_barely_trained_model_cannot_tell():
    # Adversarial: a 74-step deep-nano (0.25 tokens per parameter) used to contradict.
    flat = depth_rows("learned", [(0.35, 0.35), (0.351, 0.35), (0.349, 0.35)],
                      tokens_per_param=0.25)
    finding = claims.depth_finding(flat, LAPTOP)
    assert finding.verdict == CANNOT_TELL and "barely trained" in finding.reason


def test_initial_blocks_measure_the_initialisation():
    initial, lsq = claims.initial_blocks(row("all_ternary", "learned", 0, size="deep-nano"))
    assert sorted(initial) == list(range(12))
    # Gaussian weights: mean|W| as the scale zeroes |W| < 0.4 sd (31%), LSQ's 2 mean|W| zeroes
    # |W| < 0.8 sd (58%).
    assert all(0.28 < z < 0.34 for z in initial.values()) and 0.55 < lsq < 0.61


# ---------------------------------------------------------------------------------------------
# Report


def test_report_holds_every_claim_column_and_what_would_decide():
    findings = [claims.quality_finding(quality_rows([3.1, 3.2, 3.15]), LAPTOP),
                claims.glue_finding(glue_runs([0.8246, 0.8240, 0.8252, 0.8246]), PAPER),
                claims.footprint_finding(footprint(4.0, [0.5] * 32)),
                claims.overfit_finding(overfit_rows([3.4, 3.6, 3.5], [3.8, 3.9, 3.85]), LAPTOP),
                claims.depth_finding(depth_rows("learned", [(0.45, 0.5), (0.6, 0.5),
                                                            (0.7, 0.5)]), LAPTOP)]
    markdown, data = claims.report(findings, "test")
    lines = markdown.splitlines()
    header = lines.index("| claim | paper's figure | figure here (interval, scale) | verdict | "
                         "how measured |")
    table = lines[header + 2:header + 7]
    verdicts = [CANNOT_TELL, SUPPORTS, SUPPORTS, CONTRADICTS, CANNOT_TELL]
    for c, line, verdict in zip(CLAIMS.values(), table, verdicts):
        assert line.startswith(f"| {c.id}. ") and f"**{verdict}**" in line
        assert line.count(" | ") == 4  # five cells: no stray pipe from a figure
    assert [c["verdict"] for c in data["claims"]] == verdicts
    assert data["claims"][4]["power"]["seeds"] > 3  # the wide gap: seeds would decide it
    assert data["claims"][0]["decide"].startswith("the paper's scale")
    assert [bool(c["decide"]) for c in data["claims"]] == [v == CANNOT_TELL for v in verdicts]
    json.dumps(data)  # JSON-ready


# ---------------------------------------------------------------------------------------------
# Presets, dry run and bad input


@pytest.fixture(scope="module")
def paper_claims():
    return importlib.import_module("paper_claims")


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
    assert "60,000 TinyStories stories" in out["protocol"] and "OneCycle" in out["protocol"]
    cfg = ClaimsConfig.from_yaml(CONFIGS / "claims_paper.yaml")
    quality = cfg.studies["quality"]
    assert Scale.of(quality).is_paper() and quality.seeds == [0, 1, 2]
    assert all(t.use_gpu for s in cfg.studies.values() for t in s.trials())
    trial = quality.trials()[0]  # the paper's protocol: batch 64 x 512, smoothing 0.1, 15 epochs
    assert (trial.train.micro_batch * trial.train.grad_accum, trial.seq_len) == (64, 512)
    assert trial.train.label_smoothing == 0.1 and trial.data.max_train_docs == 60_000
    assert trial.train.steps * trial.global_batch_tokens / 12_940_000 == pytest.approx(15, rel=0.01)
    assert cfg.glue_tasks == ["mrpc", "sst2", "cola"]


def test_plan_power_prints_the_seeds_and_their_cost(paper_claims, capsys, tmp_path):
    assert paper_claims.main(["--preset", "paper", "--plan-power"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["claim 1", "claim 2", "claim 4", "claim 5"]
    # GLUE: a +-1 point band at a 2-point spread needs 36 runs; 9 run (3 x 3), so 27 more runs
    # are 9 more pretraining seeds of fp and ternary: 18 trials.
    assert "36 seeds (have 9)" in lines[1] and "9 more seeds: 18 trials" in lines[1]
    finding = claims.quality_finding(quality_rows([53.0, 63.0]), PAPER)
    _, data = claims.report([finding], "previous")
    previous = tmp_path / "claims.json"
    previous.write_text(json.dumps(data))
    assert paper_claims.main(["--preset", "paper", "--plan-power", str(previous)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"{finding.power.seeds} seeds (have 3)" in first and "measured over 2 seeds" in first


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

    from ternarylm.deploy.artifacts import save_trained
    from ternarylm.config import TrialConfig
    from ternarylm.data import build_tokenizer, eos_id
    from ternarylm.model.transformer import TernaryLM
    from ternarylm.model.plans import apply_plan

    tok = build_tokenizer("char", [])
    trial = TrialConfig(size="pico", seq_len=64, plan=plan, scheme="learned",
                        data={"source": "stories.txt", "tokenizer": "char"})
    torch.manual_seed(0)
    model = TernaryLM(trial.model_config(vocab_size=tok.get_vocab_size()))
    formats = apply_plan(model, trial.plan, trial.scheme, model.cfg.n_layers)
    return save_trained(root / plan, model, trial, formats, tok, eos_id(tok))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_GLUE / "MRPC" / "dev.tsv").is_file(),
                    reason="MRPC not found in the shared data")
def test_evidence_from_trained_models_and_report_on_mlflow(tmp_path, mlflow_uri, one_torch_thread):
    from ternarylm import tracking

    raw = yaml.safe_load((CONFIGS / "claims_laptop.yaml").read_text())
    raw |= {"footprint_size": "pico", "decode_tokens": 4, "glue_data_dir": str(SHARED_GLUE),
            "glue": {"epochs": 1, "max_train_examples": 64, "batch_size": 32, "device": "cpu"},
            "finetune_seeds": [0, 1], "peak_repeats": 2}
    cfg = ClaimsConfig.from_dict(raw)
    fp_dir, ternary_dir = trained_dir(tmp_path, "fp"), trained_dir(tmp_path, "all_ternary")
    quality = [row("fp", "learned", 0, size="pico", val_ppl=3.0, val_bpb=1.5),
               row("all_ternary", "learned", 0, size="pico", val_ppl=3.2, val_bpb=1.6)]
    quality[0]["run_id"], quality[1]["run_id"] = str(fp_dir), str(ternary_dir)
    rows = {"quality": quality, "overfit": overfit_rows([3.4, 3.6, 3.5], [1.05, 1.06, 1.04]),
            "depth": depth_rows("learned", [(0.61, 0.50), (0.60, 0.51), (0.62, 0.50)])}
    findings = claims.findings_from(cfg, rows, log=lambda line: None)
    assert [f.claim for f in findings] == [1, 2, 3, 4, 5]
    mrpc = findings[1].values["mrpc"]
    assert [r["n_dev"] for r in mrpc["runs"]["ternary"]] == [408, 408]  # two fine-tuning seeds
    assert [r["model"] for r in mrpc["runs"]["FP"]] == ["pico -/fp s0 ft0", "pico -/fp s0 ft1"]
    assert mrpc["baseline"] == pytest.approx(81.2, abs=0.05)
    memory = findings[2]
    assert memory.verdict == CANNOT_TELL  # pico stands in for paper-132m here
    assert set(memory.values) == {"random_init", "trained"}
    trained = memory.values["trained"]
    assert trained["fp32_file_bytes"] > 2 * trained["packed_file_bytes"]
    # Whole-process peaks: the runtime dwarfs a pico model, so the ratio is near 1.
    assert len(trained["fp32_peak_bytes"]) == 2 and min(trained["packed_peak_bytes"]) > 2**24
    assert 0.8 < trained["memory_ratio"] < 1.5
    assert trained["model"] == "trained pico (learned)" and trained["fp32_ms_per_token"] > 0
    assert [f.verdict for f in findings[3:]] == [SUPPORTS, SUPPORTS]
    depth = findings[4].values["schemes"]["learned"]
    assert 0.28 < depth["initial_zero"] < 0.34 and 0.55 < depth["lsq_init_zero"] < 0.61

    markdown, data = claims.report(findings, "test")
    exp = tracking.ensure_experiment("ternarylm", mlflow_uri)
    run_id = tracking.start_run(mlflow_uri, exp, "study-test", {})
    claims.log_report(mlflow_uri, [run_id], markdown, data)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="claims",
                                                     tracking_uri=mlflow_uri))
    assert (local / "claims.md").read_text() == markdown
    assert json.loads((local / "claims.json").read_text())["claims"][2]["verdict"] == CANNOT_TELL
