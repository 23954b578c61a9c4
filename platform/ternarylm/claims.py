"""The TernaryLM paper's claims (arXiv 2602.07374), re-measured, each with a verdict by rule.

Claims are data (`CLAIMS`: the paper's text and figure, and the verdict rule in words). One pure
function per claim turns measured evidence into a `Finding`: the figure measured here with its
interval and scale, and a verdict (supports / contradicts / cannot tell at this scale) decided
by that rule's code. Rule texts are built from the same constants the code compares against, so
words and code cannot drift apart. The evidence is plain data: a study's result rows (one dict
per trial: size, scheme, plan, seed, status, val_ppl, val_bpb, train_val_ratio, blocks, run_id),
MRPC dev labels and predictions, and footprint measurements.

`ClaimsConfig` (YAML: studies/configs/claims_*.yaml) names one sub-study per experiment:
`quality` (claims 1-3: FP beside ternary over seeds, whose trained models are also fine-tuned
on MRPC and packed), `overfit` (claim 4: a corpus small enough that FP overfits) and `depth`
(claim 5: a 12-block model under several ternary schemes). `run_claims` runs them, gathers the
evidence and logs `claims/claims.md` and `claims/claims.json` on every sub-study's parent run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from ternarylm.config import ConfigError, _build, load_yaml
from ternarylm.fit import compare_to_baseline
from ternarylm.model import model_config

SUPPORTS, CONTRADICTS, CANNOT_TELL = "supports", "contradicts", "cannot tell at this scale"
VERDICTS = (SUPPORTS, CONTRADICTS, CANNOT_TELL)

CONFIDENCE = 0.95  # every interval in the report
ALPHA = 0.05  # significance level of the cross-seed tests
MIN_SEEDS = 2  # an interval over seeds needs at least two
N_BOOT = 2000  # bootstrap resamples
FP_PLAN, TERNARY_PLAN = "fp", "all_ternary"
PAPER_SCHEME = "learned"  # the paper's adaptive per-layer scale; verdicts use it when measured

# What "the paper's scale" is: its model, vocabulary and corpus (the full hub TinyStories).
PAPER_SIZE, PAPER_TOKENIZER = "paper-132m", "hf:bert-base-uncased"
PAPER_CORPUS = "roneneldan/TinyStories"

# Claim 1
PAPER_PPL, PAPER_PPL_STD = 58.42, 0.17
PPL_TOLERANCE = 0.05  # relative: training budget and code differ; seed noise alone is 0.3%
# Claim 2
PAPER_MRPC_F1, MAJORITY_MRPC_F1 = 0.8247, 0.812
# Claim 3
PAPER_FP32_MB, PAPER_PACKED_MB = 1197, 498
PAPER_MEMORY_RATIO = 2.4  # 1,197 / 498 MB
LATENCY_TOLERANCE = 0.10  # "equal latency": packed at most 10% slower per token
# Claim 4
PAPER_RATIO_TERNARY, PAPER_RATIO_FP = 1.05, 3.51
OVERFIT_RATIO = 1.2  # FP overfits when its val/train perplexity ratio is at least this
# Claim 5
PAPER_DEPTH = 12
MIDDLE_BLOCKS = range(4, 9)  # L5-L9 (1-based) of 12 blocks, 0-based indices
PAPER_MIN_GAP = 0.05  # 60-62% zeros in the middle against at most 55% at the boundaries


@dataclass(frozen=True)
class Claim:
    id: int
    title: str
    text: str
    """The paper's claim."""
    paper_figure: str
    """The paper's number(s) as the report shows them."""
    rule: str
    """The verdict rule in words (the code is the claim's finding function)."""
    how: str
    """How it is measured here."""


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


CLAIMS: dict[int, Claim] = {c.id: c for c in (
    Claim(1, "TinyStories perplexity",
          "132M ternary model: TinyStories validation perplexity 58.42 +- 0.17 across seeds",
          f"ppl {PAPER_PPL} +- {PAPER_PPL_STD} (3 seeds; paper-132m, BERT vocabulary, training "
          f"loss with label smoothing 0.1)",
          f"Perplexity depends on model size, tokenizer and corpus, so the paper's figure is "
          f"compared only at its scale ({PAPER_SIZE}, {PAPER_TOKENIZER}, the full "
          f"{PAPER_CORPUS}) with at least {MIN_SEEDS} finished seeds of the ternary "
          f"'{PAPER_SCHEME}' model; anywhere else: {CANNOT_TELL}. At that scale: {SUPPORTS} when "
          f"|mean ppl - {PAPER_PPL}| <= max(the {_pct(CONFIDENCE)} t-interval half-width over "
          f"seeds, {_pct(PPL_TOLERANCE)} of {PAPER_PPL}), else {CONTRADICTS}.",
          "final validation perplexity (no label smoothing) and bits per byte of every trial; "
          "mean +- sample std and t-interval over seeds, FP beside ternary"),
    Claim(2, "MRPC F1",
          "MRPC F1 82.47 (always answering 'paraphrase' already scores 81.2 on dev)",
          f"F1 {100 * PAPER_MRPC_F1:.2f} (majority baseline {100 * MAJORITY_MRPC_F1:.1f})",
          f"Read as 'the ternary model does better than always answering the majority class'. "
          f"{SUPPORTS} when the {_pct(CONFIDENCE)} paired bootstrap intervals (over dev "
          f"examples) of both F1 minus baseline F1 and accuracy minus baseline accuracy lie "
          f"above 0; otherwise {CONTRADICTS} at the paper's scale ({PAPER_SIZE}, "
          f"{PAPER_TOKENIZER}, full {PAPER_CORPUS}) and {CANNOT_TELL} below it.",
          "the lowest-seed ternary and FP models of the quality study fine-tuned on MRPC train "
          "(precision plan kept), scored on all of MRPC dev beside the train-majority label"),
    Claim(3, "memory at equal latency",
          "2.4x less memory than FP32 (498 vs 1,197 MB) at equal latency",
          f"{PAPER_MEMORY_RATIO}x ({PAPER_PACKED_MB} vs {PAPER_FP32_MB} MB), equal latency",
          f"Decided on {PAPER_SIZE} (memory and speed do not depend on training, so random "
          f"weights are the paper's scale); without it: {CANNOT_TELL}. {SUPPORTS} when FP32 / "
          f"packed resident memory >= {PAPER_MEMORY_RATIO} and the upper end of the "
          f"{_pct(CONFIDENCE)} bootstrap interval of packed / FP32 decode time per token is <= "
          f"{1 + LATENCY_TOLERANCE:g}; {CONTRADICTS} when the memory ratio is below "
          f"{PAPER_MEMORY_RATIO} or the lower end of that interval is above "
          f"{1 + LATENCY_TOLERANCE:g}; else {CANNOT_TELL}.",
          "packed file (2-bit ternary codes, int8 embedding and head) against the FP32 file; "
          "resident memory added by loading each in a fresh process; decode ms/token at batch 1 "
          "with a KV cache, the two models alternating token by token"),
    Claim(4, "ternary regularises on small corpora",
          "train/val ratio 1.05x for ternary against 3.51x for FP32 on a small corpus",
          f"ratio {PAPER_RATIO_TERNARY} (ternary) vs {PAPER_RATIO_FP} (FP32)",
          f"Needs the paper's regime: FP must overfit (mean val/train perplexity ratio >= "
          f"{OVERFIT_RATIO}) with at least {MIN_SEEDS} finished seeds on each side, else "
          f"{CANNOT_TELL}. Then, for the '{PAPER_SCHEME}' scheme: {CONTRADICTS} when the ternary "
          f"mean ratio is not below FP's; {SUPPORTS} when it is below with a Welch t-test "
          f"p < {ALPHA} across seeds; else {CANNOT_TELL}.",
          "validation perplexity over the perplexity of a fixed training sample (eval mode) at "
          "the end of training, FP and ternary trained identically for several epochs over a "
          "small corpus; Welch t-test across seeds"),
    Claim(5, "middle layers are sparser",
          "Middle layers (L5-L9 of 12) reach 60-62% zero weights against 45-55% at the "
          "boundaries",
          "zeros 60-62% (L5-L9) vs 45-55% (other blocks)",
          f"Per seed, gap = mean zero fraction of blocks L5-L9 minus that of the other blocks "
          f"(ternary layers, end of training); {_pct(CONFIDENCE)} t-interval over seeds "
          f"(>= {MIN_SEEDS}) of a {PAPER_DEPTH}-block model, else {CANNOT_TELL}. For the "
          f"'{PAPER_SCHEME}' scheme (every scheme is reported): {SUPPORTS} when the interval "
          f"lies above 0 and reaches the paper's smallest gap of {PAPER_MIN_GAP:g} (60% vs "
          f"55%); {CONTRADICTS} when it lies below {PAPER_MIN_GAP:g}; else {CANNOT_TELL}. "
          f"Whether the gap depends on the scheme: one-way ANOVA over schemes.",
          "zero-code fraction per block at the end of training, a 12-block model trained under "
          "each ternary scheme (all_ternary), several seeds"),
)}


# ---------------------------------------------------------------------------------------------
# Evidence and findings


@dataclass(frozen=True)
class Scale:
    """The scale one sub-study ran at, as far as the claims care."""

    size: str
    tokenizer: str
    corpus: str
    max_train_bytes: int | None
    tokens: int
    """Training tokens per trial."""

    @classmethod
    def of(cls, study) -> Scale:
        """The scale of a StudyConfig (its first trial; a claims sub-study has one size)."""
        t = study.trials()[0]
        cap, source = t.data.max_train_bytes, Path(t.data.source).expanduser()
        if cap is not None and source.is_file() and source.stat().st_size <= cap:
            cap = None  # a cap above the file's size caps nothing
        return cls(",".join(study.sizes), t.data.tokenizer, t.data.source, cap,
                   t.train.steps * t.global_batch_tokens)

    def is_paper(self) -> bool:
        return (self.size == PAPER_SIZE and self.tokenizer == PAPER_TOKENIZER
                and self.corpus == PAPER_CORPUS and self.max_train_bytes is None)

    def describe(self) -> str:
        corpus = Path(self.corpus).name if "/" in self.corpus and Path(self.corpus).suffix \
            else self.corpus
        cap = f" (first {self.max_train_bytes:,} bytes)" if self.max_train_bytes else ""
        return f"{self.size}, {self.tokenizer} tokens, {corpus}{cap}, {self.tokens:,} tokens/trial"


@dataclass
class MrpcEvidence:
    """One fine-tuned model's MRPC dev predictions beside the labels."""

    model: str
    """Which model (size/scheme/plan/seed)."""
    labels: list[int]
    predictions: list[int]
    majority_label: int
    """The train split's majority label (the baseline predicts it for every example)."""


@dataclass
class Footprint:
    """A packed model against its FP32 counterpart: bytes on disk, resident bytes, decode ms."""

    model: str
    size: str
    fp32_file_bytes: int
    packed_file_bytes: int
    fp32_rss_bytes: int
    packed_rss_bytes: int
    fp32_ms: list[float]
    """Per-token decode times (batch 1), taken in turns with packed_ms."""
    packed_ms: list[float]
    threads: int


@dataclass
class Finding:
    claim: int
    figure: str
    """What was measured here, with interval and scale."""
    verdict: str
    reason: str
    """The numbers the rule compared."""
    values: dict[str, Any] = field(default_factory=dict)
    """The figures as numbers (JSON-ready)."""


@dataclass(frozen=True)
class Interval:
    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    n: int

    def text(self, fmt: str = ".4g") -> str:
        if self.std is None:
            return f"{self.mean:{fmt}} (n={self.n})"
        return (f"{self.mean:{fmt}} +- {self.std:{fmt}} [{_pct(CONFIDENCE)} CI "
                f"{self.lo:{fmt}}, {self.hi:{fmt}}] (n={self.n})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_interval(values: list[float]) -> Interval:
    """Mean, sample std and the t-interval of the mean over seeds (none below two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < MIN_SEEDS:
        return Interval(float(v.mean()) if len(v) else math.nan, None, None, None, len(v))
    std = float(v.std(ddof=1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * std / math.sqrt(len(v))
    return Interval(float(v.mean()), std, float(v.mean() - half), float(v.mean() + half), len(v))


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a paired, vectorized statistic (scipy.stats)."""
    res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=N_BOOT,
                          confidence_level=CONFIDENCE, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _finished(rows: list[dict[str, Any]], plan: str, scheme: str | None = None) -> list[dict]:
    return sorted((r for r in rows if r.get("status") == "FINISHED" and r.get("plan") == plan
                   and (scheme is None or r.get("scheme") == scheme)), key=lambda r: r["seed"])


def _schemes(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["scheme"] for r in _finished(rows, TERNARY_PLAN)})


def verdict_scheme(rows: list[dict[str, Any]]) -> str | None:
    """The scheme a verdict is decided on: the paper's when measured, else the first one."""
    schemes = _schemes(rows)
    return PAPER_SCHEME if PAPER_SCHEME in schemes else (schemes[0] if schemes else None)


def _column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


# ---------------------------------------------------------------------------------------------
# One function per claim


def quality_finding(rows: list[dict[str, Any]], scale: Scale) -> Finding:
    """Claim 1: ternary perplexity and bits per byte over seeds, FP beside it."""
    scheme = verdict_scheme(rows)
    groups = {f"ternary ({s})": _finished(rows, TERNARY_PLAN, s) for s in _schemes(rows)}
    groups["FP"] = _finished(rows, FP_PLAN)
    values, parts = {}, []
    for label, group in groups.items():
        ppl = seed_interval(_column(group, "val_ppl"))
        bpb = seed_interval(_column(group, "val_bpb"))
        if ppl.n:
            values[label] = {"val_ppl": ppl.to_json(), "val_bpb": bpb.to_json()}
            parts.append(f"{label}: ppl {ppl.text()}, bpb {bpb.text()}")
    figure = "; ".join(parts) + f"; scale: {scale.describe()}" if parts else "no finished trials"
    ppl = seed_interval(_column(groups.get(f"ternary ({scheme})", []), "val_ppl"))
    if ppl.std is None:
        return Finding(1, figure, CANNOT_TELL, f"fewer than {MIN_SEEDS} finished ternary seeds",
                       values)
    if not scale.is_paper():
        return Finding(1, figure, CANNOT_TELL,
                       f"scale {scale.describe()} is not the paper's ({PAPER_SIZE}, "
                       f"{PAPER_TOKENIZER}, full {PAPER_CORPUS}): perplexities are not comparable",
                       values)
    tolerance = max(ppl.hi - ppl.mean, PPL_TOLERANCE * PAPER_PPL)
    diff = ppl.mean - PAPER_PPL
    verdict = SUPPORTS if abs(diff) <= tolerance else CONTRADICTS
    return Finding(1, figure, verdict, f"|{ppl.mean:.4g} - {PAPER_PPL}| = {abs(diff):.3g} "
                   f"{'<=' if verdict == SUPPORTS else '>'} tolerance {tolerance:.3g}", values)


def _f1(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """F1 of the positive class along the last axis (0 when nothing is positive)."""
    tp = (y * p).sum(-1)
    wrong = (y != p).sum(-1)
    return np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)


def mrpc_scores(ev: MrpcEvidence) -> dict[str, Any]:
    """F1 and accuracy of the model and of the baseline, and bootstrap intervals (over dev
    examples, paired) of the model's margin over the baseline."""
    y, p = np.asarray(ev.labels), np.asarray(ev.predictions)
    if y.shape != p.shape or not len(y):
        raise ValueError(f"{ev.model}: {len(y)} labels but {len(p)} predictions")
    b = ev.majority_label

    def f1_margin(y, p, axis=-1):
        return _f1(y, p) - _f1(y, np.full_like(y, b))

    def accuracy_margin(y, p, axis=-1):
        return (y == p).mean(-1) - (y == b).mean(-1)

    return {"model": ev.model, "n_dev": len(y),
            "f1": float(_f1(y, p)), "accuracy": float((y == p).mean()),
            "baseline_f1": float(_f1(y, np.full_like(y, b))),
            "baseline_accuracy": float((y == b).mean()),
            "f1_margin_ci": bootstrap_interval((y, p), f1_margin),
            "accuracy_margin_ci": bootstrap_interval((y, p), accuracy_margin)}


def mrpc_finding(ternary: MrpcEvidence | None, scale: Scale,
                 fp: MrpcEvidence | None = None) -> Finding:
    """Claim 2: MRPC F1 and accuracy beside the majority baseline, bootstrap over dev."""
    if ternary is None:
        return Finding(2, "no fine-tuned ternary model", CANNOT_TELL,
                       "the quality study has no finished ternary trial to fine-tune")
    scores = {"ternary": mrpc_scores(ternary)} | ({"FP": mrpc_scores(fp)} if fp else {})
    parts = []
    for label, s in scores.items():
        parts.append(f"{label} ({s['model']}): F1 {100 * s['f1']:.1f} (margin "
                     f"{_ci(s['f1_margin_ci'], 100)}), accuracy {100 * s['accuracy']:.1f} "
                     f"(margin {_ci(s['accuracy_margin_ci'], 100)})")
    t = scores["ternary"]
    figure = (f"{'; '.join(parts)}; majority baseline F1 {100 * t['baseline_f1']:.1f}, accuracy "
              f"{100 * t['baseline_accuracy']:.1f}; {t['n_dev']} dev pairs; scale: "
              f"{scale.describe()}")
    lows = (t["f1_margin_ci"][0], t["accuracy_margin_ci"][0])
    reason = (f"{_pct(CONFIDENCE)} lower ends of the ternary model's margins over the baseline: "
              f"F1 {100 * lows[0]:+.1f}, accuracy {100 * lows[1]:+.1f} points")
    if min(lows) > 0:
        verdict = SUPPORTS
    else:
        verdict = CONTRADICTS if scale.is_paper() else CANNOT_TELL
    return Finding(2, figure, verdict, reason, scores)


def _ci(interval: tuple[float, float], scale: float = 1.0) -> str:
    return f"[{scale * interval[0]:+.1f}, {scale * interval[1]:+.1f}]"


def footprint_values(fp: Footprint) -> dict[str, Any]:
    f, p = np.asarray(fp.fp32_ms), np.asarray(fp.packed_ms)

    def ratio(f, p, axis=-1):
        return np.median(p, axis=-1) / np.median(f, axis=-1)

    return {"model": fp.model, "size": fp.size, "threads": fp.threads,
            "fp32_file_bytes": fp.fp32_file_bytes, "packed_file_bytes": fp.packed_file_bytes,
            "file_ratio": fp.fp32_file_bytes / fp.packed_file_bytes,
            "fp32_rss_bytes": fp.fp32_rss_bytes, "packed_rss_bytes": fp.packed_rss_bytes,
            # A small model's load can add nothing to the RSS the allocator already holds.
            "memory_ratio": (fp.fp32_rss_bytes / fp.packed_rss_bytes
                             if fp.packed_rss_bytes > 0 < fp.fp32_rss_bytes else None),
            "fp32_ms_per_token": float(np.median(f)), "packed_ms_per_token": float(np.median(p)),
            "latency_ratio": float(ratio(f, p)),
            "latency_ratio_ci": bootstrap_interval((f, p), ratio)}


def footprint_finding(random_init: Footprint | None, trained: Footprint | None = None) -> Finding:
    """Claim 3: memory of the packed model against FP32, and decode latency, at batch 1; the
    verdict is decided on a randomly initialised paper-132m."""
    values = {k: footprint_values(fp) for k, fp in (("random_init", random_init),
                                                     ("trained", trained)) if fp}
    parts = []
    for v in values.values():
        lo, hi = v["latency_ratio_ci"]
        memory = "n/a" if v["memory_ratio"] is None else f"{v['memory_ratio']:.2f}x"
        parts.append(f"{v['model']}: resident {v['fp32_rss_bytes'] / 2**20:.1f} -> "
                     f"{v['packed_rss_bytes'] / 2**20:.1f} MiB ({memory}), file "
                     f"{v['fp32_file_bytes'] / 2**20:.1f} -> {v['packed_file_bytes'] / 2**20:.1f}"
                     f" MiB ({v['file_ratio']:.2f}x), decode {v['fp32_ms_per_token']:.2f} -> "
                     f"{v['packed_ms_per_token']:.2f} ms/token (packed/FP32 "
                     f"{v['latency_ratio']:.2f} [{lo:.2f}, {hi:.2f}], {v['threads']} thread)")
    figure = "; ".join(parts) or "not measured"
    v = values.get("random_init")
    if random_init is None or random_init.size != PAPER_SIZE or v["memory_ratio"] is None:
        return Finding(3, figure, CANNOT_TELL, f"{PAPER_SIZE} was not measured", values)
    lo, hi = v["latency_ratio_ci"]
    limit = 1 + LATENCY_TOLERANCE
    reason = (f"{PAPER_SIZE}: memory ratio {v['memory_ratio']:.2f} vs {PAPER_MEMORY_RATIO}; "
              f"latency ratio interval [{lo:.2f}, {hi:.2f}] vs {limit:g}")
    if v["memory_ratio"] >= PAPER_MEMORY_RATIO and hi <= limit:
        verdict = SUPPORTS
    elif v["memory_ratio"] < PAPER_MEMORY_RATIO or lo > limit:
        verdict = CONTRADICTS
    else:
        verdict = CANNOT_TELL
    return Finding(3, figure, verdict, reason, values)


def overfit_finding(rows: list[dict[str, Any]], scale: Scale) -> Finding:
    """Claim 4: train/val ratio of ternary against FP over seeds, and a Welch t-test."""
    groups = {"FP": _column(_finished(rows, FP_PLAN), "train_val_ratio")}
    groups |= {s: _column(_finished(rows, TERNARY_PLAN, s), "train_val_ratio")
               for s in _schemes(rows)}
    tests = compare_to_baseline(groups, "FP") if groups["FP"] else {}
    values = {g: {**seed_interval(v).to_json(), "p_value": tests.get(g, {}).get("p_value")}
              for g, v in groups.items() if v}
    parts = [f"{'FP' if g == 'FP' else f'ternary ({g})'} {seed_interval(v).text('.3f')}"
             + (f", Welch p={tests[g]['p_value']:.3g}" if tests.get(g, {}).get("p_value")
                is not None else "")
             for g, v in groups.items() if v]
    figure = ("val/train perplexity ratio: " + "; ".join(parts) +
              f"; scale: {scale.describe()}") if parts else "no finished trials"
    scheme = verdict_scheme(rows)
    fp, tern = groups["FP"], groups.get(scheme, [])
    if len(fp) < MIN_SEEDS or len(tern) < MIN_SEEDS:
        return Finding(4, figure, CANNOT_TELL,
                       f"fewer than {MIN_SEEDS} finished seeds of FP ({len(fp)}) or ternary "
                       f"({len(tern)})", values)
    fp_mean, tern_mean = statistics.fmean(fp), statistics.fmean(tern)
    p = tests[scheme]["p_value"]
    reason = (f"FP mean ratio {fp_mean:.3f} (overfits at >= {OVERFIT_RATIO}); ternary "
              f"({scheme}) {tern_mean:.3f}; Welch p={'n/a' if p is None else f'{p:.3g}'}")
    if fp_mean < OVERFIT_RATIO:
        verdict = CANNOT_TELL
    elif tern_mean >= fp_mean:
        verdict = CONTRADICTS
    elif p is not None and p < ALPHA:
        verdict = SUPPORTS
    else:
        verdict = CANNOT_TELL
    return Finding(4, figure, verdict, reason, values)


def middle_gap(blocks: dict[Any, float]) -> float:
    """Mean zero fraction of blocks L5-L9 minus that of the other blocks of a 12-block model."""
    zeros = {int(b): float(z) for b, z in blocks.items()}
    middle = [z for b, z in zeros.items() if b in MIDDLE_BLOCKS]
    boundary = [z for b, z in zeros.items() if b not in MIDDLE_BLOCKS]
    if not middle or not boundary:
        raise ValueError(f"blocks {sorted(zeros)} do not cover both the middle and the boundary")
    return statistics.fmean(middle) - statistics.fmean(boundary)


def _gap_verdict(gap: Interval) -> str:
    if gap.std is None:
        return CANNOT_TELL
    if gap.lo > 0 and gap.hi >= PAPER_MIN_GAP:
        return SUPPORTS
    if gap.hi < PAPER_MIN_GAP:
        return CONTRADICTS
    return CANNOT_TELL


def depth_finding(rows: list[dict[str, Any]], scale: Scale) -> Finding:
    """Claim 5: middle-minus-boundary zero fraction per scheme, with intervals over seeds."""
    per_scheme: dict[str, dict[str, Any]] = {}
    for s in _schemes(rows):
        group = [r for r in _finished(rows, TERNARY_PLAN, s)
                 if r.get("blocks") and model_config(r["size"]).n_layers == PAPER_DEPTH]
        gaps = [middle_gap(r["blocks"]) for r in group]
        middle = [statistics.fmean(float(z) for b, z in r["blocks"].items()
                                   if int(b) in MIDDLE_BLOCKS) for r in group]
        boundary = [statistics.fmean(float(z) for b, z in r["blocks"].items()
                                     if int(b) not in MIDDLE_BLOCKS) for r in group]
        if gaps:
            gap = seed_interval(gaps)
            per_scheme[s] = {"gaps": gaps, "gap": gap.to_json(), "verdict": _gap_verdict(gap),
                             "middle_zero": statistics.fmean(middle),
                             "boundary_zero": statistics.fmean(boundary)}
    anova = [v["gaps"] for v in per_scheme.values() if len(v["gaps"]) >= MIN_SEEDS]
    p_scheme = float(stats.f_oneway(*anova).pvalue) if len(anova) >= 2 else None
    if p_scheme is not None and math.isnan(p_scheme):
        p_scheme = None  # every gap identical within each scheme
    values = {"schemes": per_scheme, "scheme_anova_p": p_scheme}
    parts = [f"{s}: middle {_pct(round(v['middle_zero'], 3))} vs boundary "
             f"{_pct(round(v['boundary_zero'], 3))} zeros, gap "
             f"{Interval(**v['gap']).text('.3f')} -> {v['verdict']}"
             for s, v in per_scheme.items()]
    figure = "; ".join(parts) or f"no finished {PAPER_DEPTH}-block ternary trials"
    if p_scheme is not None:
        figure += f"; gap differs by scheme: one-way ANOVA p={p_scheme:.3g}"
    figure += f"; scale: {scale.describe()}"
    scheme = verdict_scheme(rows)
    if scheme not in per_scheme:
        return Finding(5, figure, CANNOT_TELL, f"no finished {PAPER_DEPTH}-block ternary trials",
                       values)
    gap = Interval(**per_scheme[scheme]["gap"])
    reason = (f"{scheme}: gap interval "
              + ("n/a" if gap.std is None else f"[{gap.lo:.3f}, {gap.hi:.3f}]")
              + f" vs 0 and {PAPER_MIN_GAP:g}")
    return Finding(5, figure, per_scheme[scheme]["verdict"], reason, values)


# ---------------------------------------------------------------------------------------------
# Report

REPORT_COLUMNS = ("claim", "paper's figure", "figure here (interval, scale)", "verdict",
                  "how measured")


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def report(findings: list[Finding], title: str) -> tuple[str, dict[str, Any]]:
    """claims.md and the same as JSON: one row per claim, the reasons, and the verdict rules."""
    findings = sorted(findings, key=lambda f: f.claim)
    lines = [f"# {title}", "", "| " + " | ".join(REPORT_COLUMNS) + " |",
             "|" + "---|" * len(REPORT_COLUMNS)]
    for f in findings:
        c = CLAIMS[f.claim]
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"{c.id}. {c.text}", c.paper_figure, f.figure, f"**{f.verdict}**", c.how)) + " |")
    lines += ["", "## Why each verdict", ""]
    lines += [f"{f.claim}. {CLAIMS[f.claim].title}: {f.verdict} ({f.reason})" for f in findings]
    lines += ["", "## Verdict rules", "",
              f"Verdicts are {', '.join(VERDICTS)}; intervals are {_pct(CONFIDENCE)}. Each rule "
              f"is code in ternarylm.claims, applied to the numbers above.", ""]
    lines += [f"{c.id}. {c.title}: {c.rule}" for c in CLAIMS.values()]
    data = {"title": title, "columns": list(REPORT_COLUMNS),
            "claims": [{"id": f.claim, "claim": CLAIMS[f.claim].text,
                        "paper_figure": CLAIMS[f.claim].paper_figure, "figure": f.figure,
                        "verdict": f.verdict, "reason": f.reason, "how": CLAIMS[f.claim].how,
                        "rule": CLAIMS[f.claim].rule, "values": f.values} for f in findings],
            "rules": {str(c.id): c.rule for c in CLAIMS.values()}}
    return "\n".join(lines) + "\n", data


# ---------------------------------------------------------------------------------------------
# Configuration and the run

SUB_STUDIES = ("quality", "overfit", "depth")  # claims 1-3, 4 and 5


@dataclass
class ClaimsConfig:
    name: str = "claims"
    """Prefix of the sub-studies' names (`<name>-quality`, ...); a rerun continues them."""
    trial: dict[str, Any] = field(default_factory=dict)
    """Trial settings shared by every sub-study (each sub-study's own `trial` overrides)."""
    quality: dict[str, Any] = field(default_factory=dict)
    """Claims 1-3: a study (StudyConfig fields) with the fp and all_ternary plans."""
    overfit: dict[str, Any] = field(default_factory=dict)
    """Claim 4: a study with fp and all_ternary on a small corpus (trial.data.max_train_bytes)
    trained for several epochs."""
    depth: dict[str, Any] = field(default_factory=dict)
    """Claim 5: a study of a 12-block size with all_ternary under one or more schemes."""
    glue: dict[str, Any] = field(default_factory=dict)
    """Claim 2: MRPC fine-tuning settings (ternarylm.glue.GlueSettings fields)."""
    glue_data_dir: str | None = None
    """Folder of GLUE TSVs (<dir>/MRPC/train.tsv, dev.tsv); None: $TERNARYLM_GLUE_DIR or hub."""
    footprint_size: str = PAPER_SIZE
    """Claim 3: size packed and timed at random initialisation (the verdict needs paper-132m:
    memory and speed do not depend on training)."""
    decode_tokens: int = 32
    """Claim 3: timed decode steps per model."""
    cpu_threads: int = 1
    """Torch threads of the CPU work after the studies (MRPC fine-tuning on the CPU, batch-1
    decoding): on a small shared machine a second thread mostly waits for a busy core."""
    studies: dict[str, Any] = field(init=False, repr=False)
    """The sub-studies as StudyConfigs (built here, so a bad one fails before anything runs)."""

    def __post_init__(self) -> None:
        from ternarylm.glue import GlueSettings
        from ternarylm.study import StudyConfig, merge

        self.studies = {}
        for key in SUB_STUDIES:
            raw = getattr(self, key)
            if not isinstance(raw, dict) or not raw:
                raise ConfigError(f"claims.{key} must be a study (StudyConfig fields), got "
                                  f"{raw!r}")
            raw = {"name": f"{self.name}-{key}", **raw,
                   "trial": merge(self.trial, raw.get("trial", {}))}
            self.studies[key] = _build(StudyConfig, raw, f"claims.{key}")
        for key, plans in (("quality", (FP_PLAN, TERNARY_PLAN)),
                           ("overfit", (FP_PLAN, TERNARY_PLAN)), ("depth", (TERNARY_PLAN,))):
            have = {p.name for p in self.studies[key].plans}
            if missing := [p for p in plans if p not in have]:
                raise ConfigError(f"claims.{key}.plans must include {', '.join(missing)}")
        settings = GlueSettings.from_dict(self.glue)
        if settings.max_dev_examples is not None:
            raise ConfigError("claims.glue.max_dev_examples must be unset: claim 2's bootstrap "
                              "runs over the whole MRPC dev set")
        model_config(self.footprint_size)  # a known size
        for name in ("decode_tokens", "cpu_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"claims.{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClaimsConfig:
        return _build(cls, d, "claims")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClaimsConfig:
        return cls.from_dict(load_yaml(path))


def _model_label(row: dict[str, Any]) -> str:
    return f"{row['size']} {row['scheme']}/{row['plan']} s{row['seed']}"


def _first(rows: list[dict[str, Any]], plan: str, scheme: str | None = None) -> dict | None:
    done = [r for r in _finished(rows, plan, scheme) if r.get("run_id")]
    return done[0] if done else None


def mrpc_evidence(row: dict[str, Any], settings: dict[str, Any],
                  data_dir: str | None) -> MrpcEvidence:
    """Fine-tune a trial's model on MRPC train and predict all of dev (glue.finetune)."""
    from ternarylm.artifacts import load_trained
    from ternarylm.glue import GlueSettings, finetune, load_glue, majority_label, resolve_data_dir

    glue_dir = resolve_data_dir(data_dir)
    train, dev = load_glue("mrpc", "train", glue_dir), load_glue("mrpc", "dev", glue_dir)
    result = finetune(load_trained(row["run_id"]), "mrpc", GlueSettings.from_dict(settings),
                      train, dev)
    return MrpcEvidence(_model_label(row), dev.labels, result.predictions,
                        majority_label(train.labels))


def measure_footprint(model: str, size: str, fp32: Path, packed: Path, tokens: int,
                      threads: int) -> Footprint:
    from ternarylm.footprint import decode_times, resident_bytes

    fp32_ms, packed_ms = decode_times([fp32, packed], tokens, threads)
    return Footprint(model, size, fp32.stat().st_size, packed.stat().st_size,
                     resident_bytes(fp32), resident_bytes(packed), fp32_ms, packed_ms, threads)


def trained_footprint(fp_row: dict[str, Any], ternary_row: dict[str, Any], directory: Path,
                      tokens: int, threads: int) -> Footprint:
    """The trained ternary model packed, against the trained FP model of the same size in
    FP32."""
    from ternarylm.artifacts import load_trained
    from ternarylm.packing import pack_model

    files = []
    for row, dtype in ((fp_row, "fp32"), (ternary_row, "int8")):
        trained = load_trained(row["run_id"])
        files.append(pack_model(trained.model, directory / f"{row['run_id']}.safetensors",
                                trained.tokenizer, trained.eos_id, embedding_dtype=dtype).path)
    return measure_footprint(f"trained {ternary_row['size']} ({ternary_row['scheme']})",
                             ternary_row["size"], *files, tokens, threads)


def random_init_footprint(size: str, directory: Path, tokens: int, threads: int) -> Footprint:
    """A randomly initialised model, all_ternary with the paper's scheme, against FP32."""
    from ternarylm.footprint import write_models

    fp32, packed = write_models(size, TERNARY_PLAN, False, directory, scheme=PAPER_SCHEME)
    return measure_footprint(f"{size} (random init)", size, fp32, packed, tokens, threads)


def findings_from(cfg: ClaimsConfig, rows: dict[str, list[dict[str, Any]]],
                  log: Callable[[str], None] = print) -> list[Finding]:
    """Every claim's finding from the sub-studies' rows, fine-tuning and packing what the
    quality study trained."""
    scales = {k: Scale.of(s) for k, s in cfg.studies.items()}
    quality = rows["quality"]
    fp_row, tern_row = _first(quality, FP_PLAN), _first(quality, TERNARY_PLAN,
                                                         verdict_scheme(quality))
    with tempfile.TemporaryDirectory() as d:
        log(f"claim 3: packing and timing {cfg.footprint_size} and the trained models")
        random_init = random_init_footprint(cfg.footprint_size, Path(d), cfg.decode_tokens,
                                            cfg.cpu_threads)
        trained = (trained_footprint(fp_row, tern_row, Path(d), cfg.decode_tokens,
                                     cfg.cpu_threads) if fp_row and tern_row else None)
    log("claim 2: fine-tuning on MRPC")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)
    try:
        mrpc = {label: mrpc_evidence(row, cfg.glue, cfg.glue_data_dir)
                for label, row in (("ternary", tern_row), ("fp", fp_row)) if row}
    finally:
        torch.set_num_threads(threads)
    return [quality_finding(quality, scales["quality"]),
            mrpc_finding(mrpc.get("ternary"), scales["quality"], mrpc.get("fp")),
            footprint_finding(random_init, trained),
            overfit_finding(rows["overfit"], scales["overfit"]),
            depth_finding(rows["depth"], scales["depth"])]


def log_report(uri: str, run_ids: list[str], markdown: str, data: dict[str, Any]) -> None:
    """claims/claims.md and claims/claims.json on each of the runs."""
    from ternarylm import tracking

    with tempfile.TemporaryDirectory() as d:
        Path(d, "claims.md").write_text(markdown)
        Path(d, "claims.json").write_text(json.dumps(data, indent=1, default=str))
        for run_id in run_ids:
            tracking.log_artifact(uri, run_id, d, "claims")


def run_claims(cfg: ClaimsConfig, storage_path: str | None = None) -> dict[str, Any]:
    """Run the sub-studies, decide every claim, log the report on every sub-study's parent run
    (each holds part of the evidence) and return it."""
    from ternarylm import tracking
    from ternarylm.study import run_study

    summaries = {key: run_study(study, storage_path) for key, study in cfg.studies.items()}
    findings = findings_from(cfg, {k: s["rows"] for k, s in summaries.items()})
    markdown, data = report(findings, f"TernaryLM paper claims at {cfg.name}")
    parents = [s["parent_run_id"] for s in summaries.values()]
    data["parent_run_ids"] = dict(zip(summaries, parents))
    log_report(tracking.tracking_uri(), parents, markdown, data)
    return {"markdown": markdown, "report": data,
            "errors": [e for s in summaries.values() for e in s["errors"]]}
