"""The memory-quality frontier of a study: which plans give the lowest bits per byte at a number
of deployable bytes.

Every finished trial is a point (packed_bytes, val_bpb). A point is *dominated* when another
point has at most its bytes and at most its bpb, and is strictly lower in one of them. The
frontier is the set of points no other point dominates. Ties: points with exactly the same bytes
and bpb do not dominate each other, so all of them stay on the frontier; at equal bytes only the
lowest bpb stays, and at equal bpb only the fewest bytes.

Rows left out: any status but FINISHED, a missing or non-finite packed_bytes or val_bpb, and rows
flagged `search` (trials of a hyperparameter search are not candidate models).

The same points feed the precision-aware joint law (`fit.fit_precision_law` on val_bpb), which
answers what the frontier cannot: at a byte budget between measured points, which plan is
predicted best, with prediction intervals and P(plan X beats plan Y).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from ternarylm.analysis import plots

from ternarylm.core import tables
from ternarylm.analysis.fit import FitError, PrecisionLaw, fit_precision_law, plan_label
from ternarylm.analysis.plots import plt

FRONTIER_COLUMNS = ("plan", "scheme", "size", "seed", "N", "packed_bytes", "val_bpb", "run_id")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are points: finished, not from a search, with finite bytes and bpb."""
    return [r for r in rows if r.get("status") == "FINISHED" and not r.get("search")
            and _finite(r.get("packed_bytes")) and _finite(r.get("val_bpb"))]


def _dominates(q: dict[str, Any], p: dict[str, Any]) -> bool:
    qb, qv, pb, pv = q["packed_bytes"], q["val_bpb"], p["packed_bytes"], p["val_bpb"]
    return qb <= pb and qv <= pv and (qb < pb or qv < pv)


def _order(r: dict[str, Any]) -> tuple:
    return (r["packed_bytes"], r["val_bpb"], plan_label(r.get("scheme"), r["plan"]),
            str(r.get("size")), r.get("seed") or 0)


def frontier_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated points among `candidates(rows)`, by increasing bytes (then bpb)."""
    points = candidates(rows)
    # Quadratic, and clearer than a sweep: a study has at most a few hundred trials.
    return sorted((p for p in points if not any(_dominates(q, p) for q in points)), key=_order)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Points per plan label, how many of them are on the frontier, and the frontier itself."""
    points, front = candidates(rows), frontier_points(rows)
    per_plan: dict[str, dict[str, int]] = {}
    for r in points:
        entry = per_plan.setdefault(plan_label(r.get("scheme"), r["plan"]),
                                    {"points": 0, "on_frontier": 0})
        entry["points"] += 1
        entry["on_frontier"] += any(r is f for f in front)
    on = sorted((k for k, v in per_plan.items() if v["on_frontier"]),
                key=lambda k: (-per_plan[k]["on_frontier"], k))
    return {"points": len(points), "left_out": len(rows) - len(points),
            "plans": dict(sorted(per_plan.items())), "plans_on_frontier": on,
            "frontier": [_table_row(r) for r in front]}


def _table_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {c: r.get(c) for c in FRONTIER_COLUMNS}
    row["plan"] = plan_label(r.get("scheme"), r["plan"])
    return row


def markdown(table: list[dict[str, Any]], columns: tuple[str, ...] = FRONTIER_COLUMNS) -> str:
    return tables.markdown(table, columns)


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> Path:
    """Every point (one marker per plan, labelled by size) and the frontier as a step line."""
    points, front = candidates(rows), frontier_points(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        by_label.setdefault(plan_label(r.get("scheme"), r["plan"]), []).append(r)
    for i, (label, group) in enumerate(sorted(by_label.items())):
        ax.plot([r["packed_bytes"] for r in group], [r["val_bpb"] for r in group],
                _MARKERS[i % len(_MARKERS)], label=label, alpha=0.85)
        for r in group:
            ax.annotate(str(r.get("size", "")), (r["packed_bytes"], r["val_bpb"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if front:
        # The best bpb within a byte budget holds from one frontier point to the next.
        xs = [r["packed_bytes"] for r in front] + [max(r["packed_bytes"] for r in points)]
        ys = [r["val_bpb"] for r in front] + [front[-1]["val_bpb"]]
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="frontier")
    ax.set(xscale="log", xlabel="packed model bytes", ylabel="validation bits per byte",
           title="memory-quality frontier" if points else "memory-quality frontier (no points)")
    if points:
        ax.legend(fontsize=7)
    return plots._save(fig, ax, path)


def write_frontier(rows: list[dict[str, Any]], directory: str | Path) -> dict[str, Any]:
    """frontier.csv, frontier.md, frontier.png and frontier.json (the summary) in `directory`;
    returns the summary."""
    directory = Path(directory)
    summary = summarise(rows)
    with open(directory / "frontier.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
        writer.writeheader()
        writer.writerows(summary["frontier"])
    (directory / "frontier.md").write_text(markdown(summary["frontier"]))
    (directory / "frontier.json").write_text(json.dumps(summary, indent=1))
    plot_frontier(rows, directory / "frontier.png")
    return summary


def common_budgets(law: PrecisionLaw, n: int = 2) -> list[float]:
    """n byte budgets, log-spaced inside the byte range every plan was measured at (so no
    plan's N is extrapolated); none when the ranges do not overlap."""
    ranges = [r.bytes_range for r in law.bytes.values()]
    if not ranges:
        return []
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return [float(b) for b in np.geomspace(lo, hi, n + 2)[1:-1]] if lo < hi else []


def precision_law_report(rows: list[dict[str, Any]], budgets: list[float] | None = None,
                         reference: str = "fp", n_boot: int = 200, seed: int = 0
                         ) -> dict[str, Any]:
    """The joint law L(N, plan) on the frontier's points (val_bpb against N) and every plan's
    prediction at `budgets` (default: common_budgets). D is left out: in a study it is either
    one value or proportional to N (tokens_per_param), and both fold into the N term.
    {"skipped": reason} when the points cannot support the fit."""
    points = candidates(rows)
    try:
        law = fit_precision_law([r["N"] for r in points], [r["val_bpb"] for r in points],
                                [plan_label(r.get("scheme"), r["plan"]) for r in points],
                                packed_bytes=[r["packed_bytes"] for r in points],
                                reference=reference, n_boot=n_boot, seed=seed)
    except FitError as e:
        return {"skipped": str(e)}
    budgets = common_budgets(law) if budgets is None else budgets
    return {"law": law.to_json(), "budgets": [law.at_budget(b, seed=seed) for b in budgets]}


def write_precision_law(rows: list[dict[str, Any]], directory: str | Path, **kw) -> dict[str, Any]:
    """precision_law.json in `directory` (see precision_law_report, which `kw` goes to)."""
    report = precision_law_report(rows, **kw)
    (Path(directory) / "precision_law.json").write_text(json.dumps(report, indent=1))
    return report
