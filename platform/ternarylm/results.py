"""A study's results: the trial table, scaling-law fits, significance tests and plots.

Everything is read back from MLflow by trial key, so a rerun that skipped finished trials
reports on all of them. Artifacts go to the study's parent run.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from ternarylm import plots, tracking
from ternarylm.analysis import has_ternary_layers
from ternarylm.config import TrialConfig
from ternarylm.fit import FitError, compare_to_baseline, fit_scaling_law, holdout_check

COLUMNS = ("size", "scheme", "plan", "seed", "N", "D", "status", "val_loss", "val_ppl",
           "val_bpb", "train_val_ratio", "sparsity", "packed_bytes", "latent_fp32_bytes",
           "peak_rss_bytes", "tokens_per_s", "flops", "run_id")
_FINAL = {"val_loss": "val/loss", "val_ppl": "val/ppl", "val_bpb": "val/bpb",
          "train_val_ratio": "train_val_ratio", "sparsity": "sparsity/ternary",
          "packed_bytes": "memory/packed_bytes", "latent_fp32_bytes": "memory/latent_fp32_bytes",
          "peak_rss_bytes": "memory/peak_rss_bytes", "tokens_per_s": "perf/tokens_per_s",
          "flops": "progress/flops"}


def collect(trials: list[TrialConfig], uri: str) -> list[dict[str, Any]]:
    """One row per trial with its status and final metrics (None where it has none)."""
    rows = []
    for t in trials:
        exp_id = tracking.ensure_experiment(t.experiment, uri)
        run = tracking.find_run(uri, exp_id, tracking.TRIAL_KEY_TAG, t.key())
        metrics = run.data.metrics if run else {}
        row = {"size": t.size, "plan": t.plan.name, "seed": t.seed,
               "scheme": t.scheme if has_ternary_layers(t.size, t.plan) else "-",
               "N": t.model_config(256).param_counts()["params_non_embedding"],
               "D": t.train.steps * t.global_batch_tokens,
               "status": run.info.status if run else "MISSING",
               "run_id": run.info.run_id if run else None}
        row |= {col: metrics.get(f"final/{key}") for col, key in _FINAL.items()}
        row["blocks"] = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items()
                         if k.startswith("sparsity/block_")}
        rows.append(row)
    return rows


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scheme"], r["plan"])].append(r)
    return dict(groups)


def fit_groups(rows: list[dict[str, Any]], n_boot: int = 200) -> dict[str, Any]:
    """L(N) (or L(N, D) where budgets vary) per (scheme, plan) on finished trials only."""
    fits: dict[str, Any] = {}
    for (scheme, plan), group in _groups(rows).items():
        done = [r for r in group if r["status"] == "FINISHED" and r["val_loss"] is not None]
        left_out = len(group) - len(done)
        N, D, loss = ([r[k] for r in done] for k in ("N", "D", "val_loss"))
        use_d = len(set(D)) > 1
        entry: dict[str, Any] = {"scheme": scheme, "plan": plan, "points": len(done),
                                 "left_out": left_out}
        try:
            fit = fit_scaling_law(N, loss, D if use_d else None, n_boot=n_boot)
            entry["fit"] = fit.to_json()
            entry["holdout"] = holdout_check(N, loss, D if use_d else None)
        except FitError as e:
            entry["skipped"] = str(e)
        fits[f"{scheme}/{plan}"] = entry
    return fits


def significance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and scheme, each plan's final validation loss across seeds against fp's."""
    out = []
    by_size: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "FINISHED" and r["val_loss"] is not None:
            by_size[r["size"]][f"{r['scheme']}/{r['plan']}"].append(r["val_loss"])
    for size, groups in by_size.items():
        baseline = next((g for g in groups if g.endswith("/fp")), None)
        if baseline is None:
            continue
        for group, stats in compare_to_baseline(dict(groups), baseline).items():
            out.append({"size": size, "group": group, "baseline": baseline, **stats})
    return out


def write_table(rows: list[dict[str, Any]], directory: Path) -> None:
    with open(directory / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (directory / "results.md").write_text(markdown_table(rows))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ("size", "scheme", "plan", "seed", "N", "D", "status", "val_loss", "val_ppl",
            "val_bpb", "train_val_ratio", "sparsity", "packed_bytes")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report_study(study, trials: list[TrialConfig], parent_run_id: str, uri: str,
                 errors: list[str]) -> dict[str, Any]:
    """Table, fits, tests and plots on the parent run; returns a summary."""
    rows = collect(trials, uri)
    fits = fit_groups(rows)
    tests = significance(rows)
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_table(rows, d)
        (d / "fits.json").write_text(json.dumps(fits, indent=1))
        (d / "significance.json").write_text(json.dumps(tests, indent=1))
        groups = _groups([r for r in rows if r["status"] == "FINISHED"])
        plots.loss_vs_size(groups, fits, d / "loss_vs_size.png")
        plots.metric_vs_size(groups, "train_val_ratio", "train/val perplexity ratio",
                             d / "train_val_ratio_vs_size.png")
        plots.memory_vs_size(rows, d / "memory_vs_size.png")
        plots.sparsity_heatmap(rows, d / "sparsity_heatmap.png")
        tracking.log_artifact(uri, parent_run_id, d, "results")
    statuses = [r["status"] for r in rows]
    for name, value in (("trials", len(rows)), ("trials_finished", statuses.count("FINISHED")),
                        ("trials_failed", statuses.count("FAILED")),
                        ("trials_stopped_early", statuses.count("KILLED"))):
        c.log_metric(parent_run_id, f"study/{name}", value)
    warnings = []
    if study.scheduler == "asha" and "KILLED" in statuses:
        warnings.append("ASHA stopped some trials early: their losses are not final-loss points "
                        "and are left out of the fits")
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        warnings.append(f"{len(failed)} trial(s) did not finish and are left out of the fits: "
                        + ", ".join(f"{r['size']}/{r['scheme']}/{r['plan']}/s{r['seed']} "
                                    f"({r['status']})" for r in failed))
    for w in warnings:
        print(f"warning: {w}", flush=True)
    print(markdown_table(rows), flush=True)
    return {"parent_run_id": parent_run_id, "rows": rows, "fits": fits, "significance": tests,
            "errors": errors, "warnings": warnings}
