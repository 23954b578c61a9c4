"""A study's results: the trial table, scaling-law fits, significance tests and plots.

Everything is read back from MLflow by trial key, so a rerun that skipped finished trials
reports on all of them. Artifacts go to the study's parent run.
"""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ternarylm.core import metrics as M
from ternarylm.analysis import frontier, plots
from ternarylm.core import tables
from ternarylm import tracking
from ternarylm.model.stats import has_ternary_layers
from ternarylm.config import TrialConfig
from ternarylm.analysis.fit import FitError, compare_to_baseline, fit_scaling_law, holdout_check

COLUMNS = ("size", "scheme", "plan", "recipe", "seed", "lr", "N", "D", "status", *M.table_columns(),
           "run_id")


def collect(trials: list[TrialConfig], uri: str) -> list[dict[str, Any]]:
    """One row per trial with its status and final metrics (None where it has none), read
    from the trial's MLflow run."""
    rows = []
    for t in trials:
        run = tracking.find_trial_run(uri, t.experiment, t.key())
        finals = M.finals(run.data.metrics) if run else {}
        shape = t.shape
        row = {"name": t.run_name, "size": t.size, "plan": t.plan.name, "recipe": t.recipe,
               "seed": t.seed, "lr": t.train.lr,
               "scheme": t.scheme if has_ternary_layers(shape, t.plan) else "-",
               "N": shape.param_counts()["params_non_embedding"],
               "D": t.train.steps * t.global_batch_tokens,
               "status": run.info.status if run else "MISSING",
               "run_id": run.info.run_id if run else None}
        row |= {col: finals.get(name) for col, name in M.table_columns().items()}
        row["blocks"] = M.block_values(finals)
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    recipe = ("recipe",) if any(r["recipe"] for r in rows) else ()  # a study over recipes
    # lr: the cell's peak rate (its lr search's choice, when the study searched).
    cols = ("size", *recipe, "scheme", "plan", "seed", "lr", "N", "D", "status", "val_loss",
            "val_ppl", "val_bpb", "train_val_ratio", "sparsity", "packed_bytes")
    return tables.markdown(rows, cols)


def time_line(rows: list[dict[str, Any]], trained: list[str]) -> str | None:
    """Where the trials trained in this launch (`trained`: their names) spent their time (None
    if none did); a trial reused from an earlier launch carries that launch's times."""
    timed = [r for r in rows if r["name"] in trained and r["trial_wall_s"] is not None
             and r["train_loop_s"] is not None]
    if not timed:
        return None
    outside = statistics.median(r["outside_loop_s"] for r in timed)
    return (f"time: {len(timed)} trials, training loops {sum(r['train_loop_s'] for r in timed):.0f}"
            f" s in all, trials' wall time {sum(r['trial_wall_s'] for r in timed):.0f} s in all; "
            f"per trial outside the training loop: median {outside:.1f} s")


def best_per_cell(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Parent-run metrics: the lowest val bits per byte of each (size, plan) among finished
    trials (every scheme and seed of that cell)."""
    best: dict[str, float] = {}
    for r in rows:
        if r["status"] == "FINISHED" and r["val_bpb"] is not None:
            key = M.study_best(M.VAL_BPB, r["size"], r["plan"])
            best[key] = min(best.get(key, float("inf")), r["val_bpb"])
    return best


def fit_constants(fits: dict[str, Any]) -> dict[str, float]:
    """Parent-run metrics: every fitted constant of every group's scaling law."""
    out = {}
    for group, entry in fits.items():
        fit = entry.get("fit", {})
        for name in fit.get("ci", {}) or [k for k, v in fit.items()
                                          if isinstance(v, float) and k != "objective"]:
            out[M.study_fit(group, name)] = fit[name]
    return out


def log_parent_summary(uri: str, parent_run_id: str, rows: list[dict[str, Any]],
                       fits: dict[str, Any]) -> None:
    """Summary metrics on the study's parent run, so studies compare in the MLflow UI."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = best_per_cell(rows) | fit_constants(fits)
    tracking.log_metrics(uri, parent_run_id, [Metric(k, float(v), now, 0)
                                              for k, v in values.items()])


TABLE_FILES = ("tables/results.json", "tables/frontier.json")
"""The parent run's MLflow tables (`log_table`): its results and its frontier, which the run
page's artifact view shows as tables and MLflow's table APIs read (`load_table`)."""


def log_tables(uri: str, parent_run_id: str, rows: list[dict[str, Any]],
               front: list[dict[str, Any]]) -> None:
    """Log both tables; a rerun's tables replace the earlier ones (`log_table` would append
    the same trials again), in the file format `log_table` writes."""
    import pandas as pd

    c = tracking.client(uri)
    logged = {a.path for a in c.list_artifacts(parent_run_id, "tables")}
    for path, table, cols in ((TABLE_FILES[0], rows, COLUMNS),
                              (TABLE_FILES[1], front, frontier.FRONTIER_COLUMNS)):
        data = pd.DataFrame({col: [r.get(col) for r in table] for col in cols})
        if path not in logged:
            c.log_table(parent_run_id, data, path)
            continue
        with tempfile.TemporaryDirectory() as d:
            local = Path(d, Path(path).name)
            data.to_json(local, orient="split", index=False, date_format="iso")
            c.log_artifact(parent_run_id, str(local), str(Path(path).parent))


def report_lr_search(choices: list, parent_run_id: str, uri: str) -> dict[str, Any]:
    """The lr search on the parent run: every search trial's loss and each cell's chosen rate
    (CSV and a plot of the best rate against size, one line per scheme/plan), edge warnings
    as a tag. Returns {cell: {lr, losses, at_edge}}."""
    out = {c.cell: {"lr": c.lr, "losses": c.losses, "at_edge": c.at_edge} for c in choices}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        with open(d / "lr_search.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["cell", "lr", "val_loss", "chosen"])
            for c in choices:
                for lr in c.candidates:
                    writer.writerow([c.cell, lr, c.losses.get(lr), lr == c.lr])
        plots.best_lr_vs_size(out, d / "best_lr_vs_size.png")
        tracking.log_artifact(uri, parent_run_id, d, "results")
    warnings = [c.warning() for c in choices if c.warning()]
    if warnings:
        tracking.set_tags(uri, parent_run_id, {"ternarylm.lr_search.warnings":
                                               " | ".join(warnings)})
    return out


def report_study(study, trials: list[TrialConfig], parent_run_id: str, uri: str,
                 errors: list[str], trained: list[str]) -> dict[str, Any]:
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
        front = frontier.write_frontier(rows, d)  # plans compared at equal deployable bytes
        law = frontier.write_precision_law(rows, d)
        tracking.log_artifact(uri, parent_run_id, d, "results")
    log_tables(uri, parent_run_id, rows, front["frontier"])
    statuses = [r["status"] for r in rows]
    for name, value in ((M.STUDY_TRIALS, len(rows)), (M.STUDY_FINISHED, statuses.count("FINISHED")),
                        (M.STUDY_FAILED, statuses.count("FAILED")),
                        (M.STUDY_STOPPED, statuses.count("KILLED"))):
        c.log_metric(parent_run_id, name, value)
    log_parent_summary(uri, parent_run_id, rows, fits)
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
    timing = time_line(rows, trained)
    if timing:
        print(timing, flush=True)
    if front["frontier"]:
        print("frontier (packed bytes vs val bits per byte):", flush=True)
        print(frontier.markdown(front["frontier"]), flush=True)
    tracking.set_tags(uri, parent_run_id, {"ternarylm.frontier.plans": ",".join(
        sorted(front.get("plans_on_frontier", [])))})
    return {"parent_run_id": parent_run_id, "rows": rows, "fits": fits, "significance": tests,
            "frontier": front, "precision_law": law, "errors": errors, "warnings": warnings}
