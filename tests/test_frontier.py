"""The memory-quality frontier of hand-made tables, and the precision-aware joint scaling law:
recovery of known constants, interval coverage, prediction intervals, byte budgets, CSV and CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ternarylm.cli import main
from ternarylm.analysis.fit import BytesRelation, FitError, fit_precision_csv, fit_precision_law
from ternarylm.analysis.frontier import (
    common_budgets,
    frontier_points,
    precision_law_report,
    summarise,
    write_frontier,
    write_precision_law,
)


def row(plan: str, size: str, nbytes: float | None, bpb: float | None, scheme: str = "-",
        status: str = "FINISHED", **extra) -> dict:
    return {"plan": plan, "size": size, "scheme": scheme, "seed": 0, "N": 1000,
            "status": status, "packed_bytes": nbytes, "val_bpb": bpb, "run_id": None, **extra}


def keys(points: list[dict]) -> list[tuple[str, str]]:
    return [(p["plan"], p["size"]) for p in points]


# --- frontier ----------------------------------------------------------------------------------

TABLE = [
    row("fp", "pico", 1000, 2.0),          # dominated by all_ternary/tiny (900, 1.9)
    row("fp", "nano", 2000, 1.8),
    row("fp", "tiny", 4000, 1.6),
    row("all_ternary", "pico", 300, 2.3, "absmean"),
    row("all_ternary", "nano", 500, 2.1, "absmean"),
    row("all_ternary", "tiny", 900, 1.9, "absmean"),
    row("int4", "pico", 400, 2.2),
    row("int4", "nano", 700, 2.15),        # dominated by all_ternary/nano (500, 2.1)
    row("middle_ternary", "nano", 500, 2.1, "absmean"),  # an exact tie: both stay
    row("boundary_int8", "pico", 300, 2.4, "absmean"),   # same bytes, higher bpb: dominated
    row("boundary_int8", "nano", 600, 2.1, "absmean"),   # same bpb, more bytes: dominated
    # left out: each would dominate every other point if it counted
    row("int8", "pico", 100, 1.0, search=True),
    row("int8", "nano", 100, 1.0, status="FAILED"),
    row("int8", "tiny", 100, None),
    row("int8", "micro", None, 1.0),
    row("int8", "mini", 100, float("nan")),
]
FRONTIER = [("all_ternary", "pico"), ("int4", "pico"), ("all_ternary", "nano"),
            ("middle_ternary", "nano"), ("all_ternary", "tiny"), ("fp", "nano"), ("fp", "tiny")]


def test_frontier_of_a_hand_made_table():
    assert keys(frontier_points(TABLE)) == FRONTIER


def test_frontier_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = [TABLE[i] for i in rng.permutation(len(TABLE))]
        assert keys(frontier_points(shuffled)) == FRONTIER


def test_single_plan():
    curve = [row("fp", s, b, v) for s, b, v in
             [("pico", 100, 3.0), ("nano", 200, 2.5), ("tiny", 400, 2.2)]]
    assert keys(frontier_points(curve)) == [("fp", "pico"), ("fp", "nano"), ("fp", "tiny")]
    worse = curve + [row("fp", "micro", 800, 2.3)]  # bigger and worse than tiny: dominated
    assert keys(frontier_points(worse)) == [("fp", "pico"), ("fp", "nano"), ("fp", "tiny")]
    assert keys(frontier_points([curve[0]])) == [("fp", "pico")]
    assert frontier_points([]) == []


def test_summary_counts_plans():
    s = summarise(TABLE)
    assert s["points"] == 11 and s["left_out"] == 5
    assert s["plans"]["absmean/all_ternary"] == {"points": 3, "on_frontier": 3}
    assert s["plans"]["fp"] == {"points": 3, "on_frontier": 2}
    assert s["plans"]["int4"] == {"points": 2, "on_frontier": 1}
    assert s["plans"]["absmean/boundary_int8"] == {"points": 2, "on_frontier": 0}
    assert s["plans_on_frontier"] == ["absmean/all_ternary", "fp", "absmean/middle_ternary",
                                      "int4"]
    assert "int8" not in s["plans"]


def test_write_frontier(tmp_path: Path):
    summary = write_frontier(TABLE, tmp_path)
    with open(tmp_path / "frontier.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["plan"], r["size"]) for r in table] == [
        ("absmean/all_ternary", "pico"), ("int4", "pico"), ("absmean/all_ternary", "nano"),
        ("absmean/middle_ternary", "nano"), ("absmean/all_ternary", "tiny"), ("fp", "nano"),
        ("fp", "tiny")]
    assert [float(r["packed_bytes"]) for r in table] == [300, 400, 500, 500, 900, 2000, 4000]
    markdown = (tmp_path / "frontier.md").read_text().splitlines()
    assert markdown[0].startswith("| plan | scheme | size |") and len(markdown) == 2 + 7
    assert json.loads((tmp_path / "frontier.json").read_text()) == summary
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_frontier([], tmp_path)  # nothing finished yet: empty table, an empty figure
    assert (tmp_path / "frontier.md").read_text().count("\n") == 2


# --- precision-aware joint law -----------------------------------------------------------------

TRUTH = {"E": 1.2, "A": 30.0, "alpha": 0.3, "f[int4]": 0.6, "f[int8]": 0.9, "f[ternary]": 0.25}
PLANS = ("fp", "int8", "int4", "ternary")
BITS = {"fp": 16, "int8": 8, "int4": 4, "ternary": 2}
NOISE = 0.01  # multiplicative, 1%


def true_loss(N: np.ndarray, plan: np.ndarray) -> np.ndarray:
    f = np.array([1.0 if p == "fp" else TRUTH[f"f[{p}]"] for p in plan])
    return TRUTH["E"] + TRUTH["A"] * (N * f) ** -TRUTH["alpha"]


def packed(N: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """Bytes of a model: its weights at the plan's bits, plus an fp16 vocabulary ~ sqrt(N)."""
    return N * np.array([BITS[p] for p in plan]) / 8 + 2 * 256 * np.sqrt(N)


def synthetic(seed: int, sizes: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N = np.tile(np.logspace(5, 7, sizes), len(PLANS))
    plan = np.repeat(PLANS, sizes)
    rng = np.random.default_rng(seed)
    return N, true_loss(N, plan) * np.exp(rng.normal(0.0, NOISE, N.size)), plan


@pytest.fixture(scope="module")
def law():
    N, loss, plan = synthetic(1, sizes=8)
    return fit_precision_law(N, loss, plan, packed_bytes=packed(N, plan), n_boot=100, seed=0)


def test_joint_fit_recovers_the_constants(law):
    assert law.form == "L(N,plan)" and law.plans == ("fp", "int4", "int8", "ternary")
    assert law.n_points == 32 and law.dof == 32 - 6
    rel = {"E": 0.05, "A": 0.3, "alpha": 0.1, "f[int4]": 0.15, "f[int8]": 0.15,
           "f[ternary]": 0.15}
    for name, value in TRUTH.items():
        assert law.params[name] == pytest.approx(value, rel=rel[name]), name
        lo, hi = law.ci[name]
        assert lo <= value <= hi and lo <= law.params[name] <= hi, name
    assert law.residual_sd == pytest.approx(NOISE, rel=0.5)


@pytest.mark.slow
def test_joint_intervals_cover_the_truth():
    """100 synthetic data sets from the law: each constant's 95% interval covers it >= 90 times."""
    hits = dict.fromkeys(TRUTH, 0)
    for rep in range(100):
        N, loss, plan = synthetic(1000 + rep)
        fit = fit_precision_law(N, loss, plan, n_boot=40, seed=rep)
        for name, value in TRUTH.items():
            lo, hi = fit.ci[name]
            hits[name] += lo <= value <= hi
    print(json.dumps({"coverage_of_100": hits}))
    assert all(h >= 90 for h in hits.values()), hits


def test_budget_predictions(law):
    budgets = (5e5, 2e6)  # inside every plan's measured byte range
    for budget in budgets:
        out = law.at_budget(budget)
        assert out["budget_bytes"] == budget and set(out["plans"]) == set(PLANS)
        true = {}
        for plan, e in out["plans"].items():
            # the bytes relation inverts the packed size the data were made with
            assert packed(np.array([e["N"]]), np.array([plan]))[0] == pytest.approx(budget,
                                                                                    rel=0.1)
            assert not e["extrapolated"]
            # a prediction interval holds the noise of one more run: wider than the mean's CI
            assert e["pi"][0] < e["ci"][0] <= e["loss"] <= e["ci"][1] < e["pi"][1], plan
            true[plan] = true_loss(np.array([e["N"]]), np.array([plan]))[0]
            assert e["ci"][0] - 0.01 <= true[plan] <= e["ci"][1] + 0.01, plan
        # the predicted best is the true best, or within the fit's error of it
        assert true[out["best"]] <= min(true.values()) + 0.01
        p, means = out["p_beats"], out["mean_lower_share"]
        # int8 keeps 90% of the parameters' worth at half fp's bytes: a clear win of the means;
        # one more run of each carries its own noise, so the win of one run is less sure.
        assert means["int8"]["fp"] > 0.95
        assert 0.5 < p["int8"]["fp"] < means["int8"]["fp"]
    assert law.at_budget(1e9)["plans"]["fp"]["extrapolated"]


def test_bytes_relation_is_exact_on_a_power_law():
    N = np.logspace(5, 8, 6)
    rel = BytesRelation.fit(N, 3.0 * N**0.9)
    assert rel.slope == pytest.approx(0.9) and rel.max_rel_error < 1e-9
    assert rel.n_at(3.0 * 2e6**0.9) == pytest.approx(2e6)


def test_joint_fit_with_token_budgets():
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(5, 7, 4), np.logspace(7, 9, 3)))
    N, D = np.tile(N, 2), np.tile(D, 2)
    plan = np.repeat(["fp", "ternary"], 12)
    loss = true_loss(N, plan) + 50.0 * D**-0.25
    law = fit_precision_law(N, loss, plan, D, packed_bytes=packed(N, plan), n_boot=0)
    assert law.form == "L(N,D,plan)" and law.ci == {}
    assert law.params["beta"] == pytest.approx(0.25, rel=0.05)
    assert law.params["f[ternary]"] == pytest.approx(0.25, rel=0.05)
    with pytest.raises(FitError, match="give D"):
        law.at_budget(1e6)
    assert "ci" not in law.at_budget(1e6, D=1e8)["plans"]["fp"]


@pytest.mark.parametrize("change, message", [
    ({"reference": "bf16"}, "reference plan 'bf16' has no points"),
    ({"keep": True}, "needs at least 7 distinct (plan, N, D) points, got 6"),
    ({"n_boot": -1}, "n_boot must be >= 0"),
])
def test_joint_fit_refuses(change, message):
    N, loss, plan = synthetic(0, sizes=4)
    # 4 distinct N, but 6 points for 6 parameters: fp at three sizes, each other plan at one
    keep = [0, 1, 2, 7, 8, 12] if change.pop("keep", None) else slice(None)
    with pytest.raises(FitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_precision_law(N[keep], loss[keep], plan[keep], **change)


def write_results(path: Path) -> Path:
    """A study's results.csv, as results.write_table writes it (a failed trial included)."""
    N, loss, plan = synthetic(3)
    columns = ["size", "scheme", "plan", "seed", "N", "D", "status", "val_loss", "val_bpb",
               "packed_bytes"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for n, v, p in zip(N, loss, plan):
            w.writerow({"size": "s", "scheme": "absmean" if p == "ternary" else "-",
                        "plan": "all_ternary" if p == "ternary" else p, "seed": 0, "N": n,
                        "D": 150000, "status": "FINISHED", "val_loss": 3 * v, "val_bpb": v,
                        "packed_bytes": packed(np.array([n]), np.array([p]))[0]})
        w.writerow({"size": "s", "scheme": "absmean", "plan": "all_ternary", "seed": 1,
                    "N": 1e6, "D": 150000, "status": "FAILED"})
    return path


def test_joint_fit_of_a_results_csv(tmp_path: Path):
    law = fit_precision_csv(write_results(tmp_path / "results.csv"), n_boot=0)
    assert law.plans == ("fp", "absmean/all_ternary", "int4", "int8")
    assert law.n_points == 20  # the FAILED row is left out
    assert law.params["f[absmean/all_ternary]"] == pytest.approx(0.25, rel=0.2)


def test_cli_fit_joint(tmp_path: Path, capsys):
    path = write_results(tmp_path / "results.csv")
    assert main(["fit", str(path), "--joint", "--budget", "3e5", "2e6", "--bootstrap", "30",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["form"] == "L(N,plan)" and set(out["ci"]) == {
        "E", "A", "alpha", "f[absmean/all_ternary]", "f[int4]", "f[int8]"}
    assert [b["budget_bytes"] for b in out["budgets"]] == [3e5, 2e6]
    assert set(out["budgets"][0]["p_beats"]["int8"]) == {"fp", "absmean/all_ternary", "int4"}
    assert out["ci_method"] == "parametric" and 0 <= out["boot_failed"] <= 1  # one seed a cell
    assert main(["fit", str(path), "--joint", "--budget", "1e6", "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    assert "best:" in text and "no intervals (--bootstrap 0)" in text


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1e6"], "--budget needs --joint"),
    (["--joint", "--reference", "int2"], "reference plan 'int2' has no points"),
    (["--joint", "--budget", "-5", "--bootstrap", "0"], "a byte budget must be positive"),
])
def test_cli_fit_joint_refuses(tmp_path: Path, capsys, argv, message):
    path = write_results(tmp_path / "results.csv")
    assert main(["fit", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def study_rows(seed: int = 5) -> list[dict]:
    """A study's result rows made by the law (val_bpb), with bytes from `packed`."""
    N, loss, plan = synthetic(seed)
    return [row("all_ternary" if p == "ternary" else p, f"s{i % 5}",
                packed(np.array([n]), np.array([p]))[0], v,
                "absmean" if p == "ternary" else "-", N=n) for i, (n, v, p) in
            enumerate(zip(N, loss, plan))]


def test_study_report_of_the_precision_law(tmp_path: Path):
    rows = study_rows() + [row("int8", "s9", 100, 0.5, search=True)]  # left out of the fit
    report = write_precision_law(rows, tmp_path, n_boot=30)
    assert json.loads((tmp_path / "precision_law.json").read_text()) == report
    law = report["law"]
    assert law["n_points"] == 20 and law["plans"] == ["fp", "absmean/all_ternary", "int4", "int8"]
    assert law["f[absmean/all_ternary]"] == pytest.approx(0.25, rel=0.2)
    budgets = [b["budget_bytes"] for b in report["budgets"]]
    assert len(budgets) == 2 and budgets[0] < budgets[1]
    for b in report["budgets"]:
        assert not any(e["extrapolated"] for e in b["plans"].values())
        assert set(b["p_beats"]["int4"]) == {"fp", "absmean/all_ternary", "int8"}
    assert [b["budget_bytes"] for b in precision_law_report(rows, budgets=[4e5], n_boot=0)[
        "budgets"]] == [4e5]


def test_study_report_says_why_it_cannot_fit():
    report = precision_law_report(TABLE)  # every point has the same N
    assert "distinct N values" in report["skipped"]


def test_common_budgets_need_overlapping_ranges():
    N = np.logspace(5, 6, 4)
    loss = true_loss(N, np.array(["fp"] * 4))
    law = fit_precision_law(np.r_[N, N], np.r_[loss, loss * 1.1], ["fp"] * 4 + ["int4"] * 4,
                            packed_bytes=np.r_[N * 2, N / 100], n_boot=0)
    assert common_budgets(law) == []  # int4's largest model is smaller than fp's smallest


def test_a_plan_without_a_bytes_relation_is_skipped_at_a_budget():
    N, loss, plan = synthetic(2, sizes=4)
    keep = np.r_[0:12, 12]  # ternary at one size only: its bytes cannot be related to N
    law = fit_precision_law(N[keep], loss[keep], plan[keep],
                            packed_bytes=packed(N[keep], plan[keep]), n_boot=20)
    out = law.at_budget(1e6)
    assert "skipped" in out["plans"]["ternary"] and "ternary" not in out["p_beats"]
    assert set(out["p_beats"]) == {"fp", "int8", "int4"}
