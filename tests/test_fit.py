"""Scaling-law fitter: recovery of known constants, intervals, held-out check, CSV input."""

import json
from pathlib import Path

import numpy as np
import pytest

from ternarylm.analysis import fit as fit_module
from ternarylm.cli import main
from ternarylm.analysis.fit import (
    FitError,
    ScalingFit,
    compare_to_baseline,
    fit_csv,
    fit_csv_groups,
    fit_scaling_law,
    holdout_check,
)

TRUE_N = {"E": 1.8, "A": 400.0, "alpha": 0.34}
TRUE_ND = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
NOISE = 0.005  # multiplicative, ~0.5%


def law_n(N: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * N**-alpha


def law_nd(
    N: np.ndarray, D: np.ndarray, E: float, A: float, alpha: float, B: float, beta: float
) -> np.ndarray:
    return E + A * N**-alpha + B * D**-beta


def data_n(seed: int = 1, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    N = np.logspace(6, 9, 8)
    rng = np.random.default_rng(seed)
    return N, law_n(N, **TRUE_N) * np.exp(rng.normal(0.0, noise, N.size))


def data_nd(seed: int = 2, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5)))
    rng = np.random.default_rng(seed)
    return N, D, law_nd(N, D, **TRUE_ND) * np.exp(rng.normal(0.0, noise, N.size))


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def assert_recovers(fit: ScalingFit, truth: dict[str, float], rel: dict[str, float]) -> None:
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=rel[name]), name
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, f"95% interval of {name} {fit.ci[name]} misses {value}"
        assert lo <= fit.params[name] <= hi, name


@pytest.fixture(scope="module")
def fit_n() -> ScalingFit:
    return fit_scaling_law(*data_n(), n_boot=100, seed=0)


@pytest.fixture(scope="module")
def fit_nd() -> ScalingFit:
    N, D, loss = data_nd()
    return fit_scaling_law(N, loss, D, n_boot=100, seed=0)


def test_recovers_l_n(fit_n: ScalingFit) -> None:
    assert fit_n.form == "L(N)"
    assert fit_n.n_points == 8
    assert_recovers(fit_n, TRUE_N, {"E": 0.05, "A": 0.25, "alpha": 0.05})


def test_recovers_l_nd(fit_nd: ScalingFit) -> None:
    assert fit_nd.form == "L(N,D)"
    assert fit_nd.n_points == 25
    rel = {"E": 0.05, "A": 0.25, "alpha": 0.05, "B": 0.25, "beta": 0.05}
    assert_recovers(fit_nd, TRUE_ND, rel)


def test_exact_recovery_on_clean_data_over_wide_range() -> None:
    N = np.logspace(5, 10, 10)
    fit = fit_scaling_law(N, law_n(N, **TRUE_N), n_boot=0)
    for name, value in TRUE_N.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-6)
    assert fit.ci == {}


def test_predict(fit_n: ScalingFit, fit_nd: ScalingFit) -> None:
    N = np.array([1e7, 1e10])
    assert fit_n.predict(N).shape == (2,)
    assert fit_n.predict(N) == pytest.approx(law_n(N, **TRUE_N), rel=0.02)
    D = np.array([1e9, 1e12])
    assert fit_nd.predict(N, D) == pytest.approx(law_nd(N, D, **TRUE_ND), rel=0.02)
    with pytest.raises(ValueError, match="needs D"):
        fit_nd.predict(N)


def test_to_json_is_plain(fit_nd: ScalingFit) -> None:
    out = fit_nd.to_json()
    assert set(out) == {"form", "E", "A", "alpha", "B", "beta", "ci", "n_points", "objective",
                        "ci_method", "boot_failed"}
    assert out["ci_method"] == "parametric"  # one seed per (N, D) cell
    assert all(type(out[k]) is float
               for k in ("E", "A", "alpha", "B", "beta", "objective", "boot_failed"))
    assert all(type(v) is list and all(type(x) is float for x in v) for v in out["ci"].values())
    assert json.loads(json.dumps(out)) == out


def test_bootstrap_is_deterministic_given_seed() -> None:
    N, loss = data_n()
    a = fit_scaling_law(N, loss, n_boot=20, seed=7)
    b = fit_scaling_law(N, loss, n_boot=20, seed=7)
    c = fit_scaling_law(N, loss, n_boot=20, seed=8)
    assert a.ci == b.ci
    assert a.ci != c.ci


def test_constant_d_fits_l_n() -> None:
    N, loss = data_n()
    fit = fit_scaling_law(N, loss, np.full(N.size, 2e10), n_boot=0)
    assert fit.form == "L(N)"


def test_holdout_clean_data() -> None:
    N = np.logspace(6, 9, 8)
    out = holdout_check(N, law_n(N, **TRUE_N))
    assert out["held_out_N"] == 1e9
    assert out["actual"] == pytest.approx(law_n(1e9, **TRUE_N))
    assert out["abs_error"] < 1e-4
    assert out["rel_error"] < 1e-4


def test_holdout_noisy_l_nd() -> None:
    N, D, loss = data_nd()
    out = holdout_check(N, loss, D)
    assert out["n_held_out"] == 5  # every token budget at the largest size
    assert out["rel_error"] < 0.02


def test_fit_csv_n_only(tmp_path: Path) -> None:
    N, loss = data_n()
    path = write_csv(tmp_path / "n.csv", "N,loss", [f"{n},{l}" for n, l in zip(N, loss)])
    fit = fit_csv(path, n_boot=0)
    assert fit.form == "L(N)"
    assert fit.params == fit_scaling_law(N, loss, n_boot=0).params


def test_cli_says_how_the_intervals_were_made(tmp_path: Path, capsys) -> None:
    N, loss = seeded_data(4, 3, 0)
    path = write_csv(tmp_path / "n.csv", "N,loss", [f"{n},{l}" for n, l in zip(N, loss)])
    assert main(["fit", str(path), "--bootstrap", "10"]) == 0
    assert "95% CIs: seeds bootstrap" in capsys.readouterr().out


def test_fit_csv_n_d(tmp_path: Path) -> None:
    N, D, loss = data_nd()
    rows = [f"ternary,{n}, {d} ,{l}" for n, d, l in zip(N, D, loss)]
    path = write_csv(tmp_path / "nd.csv", "scheme, N, D, loss", rows)
    fit = fit_csv(str(path), n_boot=0)
    assert fit.form == "L(N,D)"
    assert fit.params["alpha"] == pytest.approx(TRUE_ND["alpha"], rel=0.05)


def test_fit_csv_groups(tmp_path: Path) -> None:
    N, loss = data_n()
    rows = [
        f"{scheme},chinchilla,{n},{l * scale}"
        for scheme, scale in (("bf16", 1.0), ("ternary", 1.1))
        for n, l in zip(N, loss)
    ]
    path = write_csv(tmp_path / "g.csv", "scheme,plan,N,loss", rows)
    fits = fit_csv_groups(path, n_boot=0)
    assert set(fits) == {("bf16", "chinchilla"), ("ternary", "chinchilla")}
    assert fits[("ternary", "chinchilla")].params["E"] > fits[("bf16", "chinchilla")].params["E"]
    with pytest.raises(FitError, match=r"g\.csv: holds 2 \(scheme, plan\) groups"):
        fit_csv(path)


BAD_CSVS = [
    ("N,val_loss", ["1e6,5"], r"bad\.csv: missing column 'loss'"),
    ("N,loss", ["1e6,5", "1e7,abc"], r"bad\.csv line 3: column 'loss' has non-numeric value 'abc'"),
    ("N,loss", ["1e6,5", ",4"], r"line 3: column 'N' has non-numeric value ''"),
    ("N,loss", ["1e6,5", "-1e7,4"], r"line 3: column 'N' has non-positive or non-finite value '-1e7'"),
    ("N,D,loss", ["1e6,0,5"], r"line 2: column 'D' has non-positive"),
    ("N,loss", ["1e6,5", "1e7,nan"], r"column 'loss' has non-positive or non-finite value 'nan'"),
    (
        "N,loss",
        ["1e6,5", "1e7,4", "1e8,3", "1e8,3.01"],
        r"bad\.csv: L\(N\) has 3 parameters and needs at least 4 distinct N values, got 3",
    ),
    (
        "N,D,loss",
        ["1e6,1e9,5", "1e7,1e9,4", "1e6,1e10,4.5", "1e7,1e10,3.5"],
        r"needs at least 3 distinct N and 3 distinct D",
    ),
    (
        "N,D,loss",
        ["1e6,1e8,5", "1e7,1e9,4", "1e8,1e10,3", "1e6,1e9,4.5", "1e7,1e10,3.5"],
        r"at least 6 distinct \(N, D\) points, got 5",
    ),
]


@pytest.mark.parametrize(("header", "rows", "message"), BAD_CSVS)
def test_bad_csv(tmp_path: Path, header: str, rows: list[str], message: str) -> None:
    with pytest.raises(FitError, match=message):
        fit_csv(write_csv(tmp_path / "bad.csv", header, rows))


def test_unreadable_csv(tmp_path: Path) -> None:
    with pytest.raises(FitError, match="cannot read"):
        fit_csv(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FitError, match="empty.csv: empty file"):
        fit_csv(tmp_path / "empty.csv")
    with pytest.raises(FitError, match="header.csv: no data rows"):
        fit_csv(write_csv(tmp_path / "header.csv", "N,loss", []))


def test_bad_arrays() -> None:
    with pytest.raises(FitError, match="same length"):
        fit_scaling_law([1e6, 1e7, 1e8, 1e9], [5, 4, 3])
    with pytest.raises(FitError, match="loss must hold positive finite numbers"):
        fit_scaling_law([1e6, 1e7, 1e8, 1e9], [5, 4, 0, 3])
    with pytest.raises(FitError, match="held-out check"):
        holdout_check([1e6, 1e7, 1e8, 1e9], [5, 4, 3, 2.5])


def test_compare_to_baseline() -> None:
    rng = np.random.default_rng(3)
    groups = {
        "bf16": list(rng.normal(3.00, 0.02, 5)),
        "ternary": list(rng.normal(3.10, 0.02, 5)),
        "ternary_same": list(rng.normal(3.00, 0.02, 5)),
        "single": [3.05],
    }
    out = compare_to_baseline(groups, "bf16")
    assert out["ternary"]["p_value"] < 0.01
    assert out["ternary"]["diff"] == pytest.approx(0.1, abs=0.03)
    assert out["ternary_same"]["p_value"] > 0.05
    assert out["bf16"]["p_value"] is None
    single_diff = pytest.approx(3.05 - out["bf16"]["mean"])
    assert out["single"] == {"mean": 3.05, "std": None, "n": 1, "diff": single_diff, "p_value": None}
    assert out["ternary"]["n"] == 5
    assert out["ternary"]["std"] == pytest.approx(np.std(groups["ternary"], ddof=1))
    with pytest.raises(ValueError, match="baseline group 'fp32'"):
        compare_to_baseline(groups, "fp32")


def test_minimum_points_give_no_intervals_rather_than_zero_width_ones():
    rng = np.random.default_rng(1)
    N = np.logspace(5, 6.5, 4)
    loss = (1.8 + 40 * N ** -0.3) * (1 + 0.005 * rng.standard_normal(4))
    exact = fit_scaling_law(N, loss, n_boot=50)
    assert exact.ci == {} and "leave 1 degree(s) of freedom" in exact.to_json()["ci_note"]
    N5 = np.logspace(5, 6.5, 5)
    loss5 = (1.8 + 40 * N5 ** -0.3) * (1 + 0.005 * rng.standard_normal(5))
    spread = fit_scaling_law(N5, loss5, n_boot=50)
    assert spread.ci_note is None
    assert all(hi > lo for lo, hi in spread.ci.values())


def seeded_data(sizes: int, seeds: int, rep: int) -> tuple[np.ndarray, np.ndarray]:
    """`seeds` runs at each of `sizes` model sizes, from the known law with known noise."""
    N = np.repeat(np.logspace(6, 9, sizes), seeds)
    rng = np.random.default_rng(500 + rep)
    return N, law_n(N, **TRUE_N) * np.exp(rng.normal(0.0, NOISE, N.size))


@pytest.mark.parametrize(("sizes", "seeds", "method"), [(6, 1, "parametric"), (4, 3, "seeds")])
def test_intervals_cover_the_truth_at_about_the_nominal_rate(sizes, seeds, method):
    """20 data sets: each 95% interval covers its constant in 16 or more (at a true 95%: 99.7%
    of the time), and is as wide as the spread of the estimates over the data sets says
    (median width / (2 * 1.96 * their sd) within [0.5, 2]: not covering by being wide)."""
    fits = [fit_scaling_law(*seeded_data(sizes, seeds, rep), n_boot=20, seed=rep)
            for rep in range(20)]
    assert all(f.ci_method == method and f.boot_failed < 0.1 for f in fits)
    for name, value in TRUE_N.items():
        hits = sum(f.ci[name][0] <= value <= f.ci[name][1] for f in fits)
        widths = [f.ci[name][1] - f.ci[name][0] for f in fits]
        spread = 2 * 1.96 * np.std([f.params[name] for f in fits], ddof=1)
        assert hits >= 16, (name, hits)
        assert 0.5 <= np.median(widths) / spread <= 2, (name, np.median(widths) / spread)


def test_every_refit_keeps_every_size_and_none_is_redrawn(monkeypatch):
    """One seed per size: a draw that resampled sizes would refit on repeated and missing sizes
    (and need redraws when too few were left); every refit must see the data's own sizes."""
    seen = []
    minimise = fit_module._minimise

    def spy(prob, starts):
        seen.append(prob.x.copy())
        return minimise(prob, starts)

    monkeypatch.setattr(fit_module, "_minimise", spy)
    N, loss = data_n()
    fit = fit_scaling_law(N, loss, n_boot=15, seed=3)
    assert len(seen) == 1 + 15  # the fit, then one refit per draw
    assert all(np.array_equal(x, seen[0]) for x in seen)
    assert fit.ci_method == "parametric"


def test_refits_that_do_not_converge_are_kept_and_counted(monkeypatch):
    """No draw is dropped or redrawn for a failed refit: its share is reported instead."""
    monkeypatch.setitem(fit_module._LBFGS_OPTIONS, "maxiter", 1)
    fit = fit_scaling_law(*data_n(), n_boot=10, seed=0)
    assert fit.boot_failed == 1.0 and set(fit.ci) == set(TRUE_N)
    assert fit.to_json()["boot_failed"] == 1.0


def test_seeds_that_agree_give_no_intervals():
    N, loss = seeded_data(5, 1, 0)
    fit = fit_scaling_law(np.repeat(N, 3), np.repeat(loss, 3), n_boot=20)
    assert fit.ci == {} and "every cell's seeds have the same loss" in fit.ci_note
