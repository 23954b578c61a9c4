"""benchmarks/quality_gap.py: every recipe's trial at nanoGPT's CPU baby-GPT budget, built as a
study builds its recipe cells; bad input is one line and exit status 2; the gap arithmetic and
verdict. (The trials themselves run through `run_trial`, which test_trial covers.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import ternarylm.model.recipes
import ternarylm.orchestration.study
from ternarylm.model.plans import PrecisionPlan
from ternarylm.model.recipes import RECIPES
from ternarylm.orchestration.study import StudyConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality_gap.py"
# Loaded by path: benchmarks/ is a folder of scripts, not a package.
_spec = importlib.util.spec_from_file_location("quality_gap", SCRIPT)
qg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qg)

ALL = ["fp", "paper", "bitnet_b158", "trilm", "paretoq", "absmean"]
# What a recipe may set, and so what may differ between rows.
RECIPE_FIELDS = {"block", "scheme", "plan", "recipe"}
RECIPE_TRAIN_FIELDS = set().union(*(r.train for r in RECIPES.values()))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text("It is a capital mistake to theorize before one has data.\n" * 50)
    return path


@pytest.fixture(scope="module")
def trials() -> dict:
    return qg.build_trials(ALL, qg.shared_trial(2000, 1e-3, "/data/sherlock.txt"))


def test_default_rows_are_every_recipe_and_plain_absmean():
    assert qg.DEFAULT_RECIPES == ALL
    assert qg.parse_recipes(" fp, absmean ,paretoq") == ["fp", "absmean", "paretoq"]
    # The study's own merge and recipe overrides, not copies of them.
    assert qg.merge is ternarylm.orchestration.study.merge
    assert qg.recipe_overrides is ternarylm.model.recipes.recipe_overrides


def test_every_trial_has_the_baby_gpt_shape_and_budget(trials):
    for name, t in trials.items():
        shape = t.model_config(vocab_size=257)
        assert (shape.width, shape.n_layers, shape.n_heads) == (128, 4, 4), name
        assert t.size == "micro" and t.seq_len == 64 and t.dropout == 0.0, name
        assert t.train.micro_batch == 12 and t.train.grad_accum == 1, name
        assert t.train.steps == 2000 and t.train.lr == 1e-3 and t.train.warmup_steps == 100
        assert t.train.betas == (0.9, 0.99) and t.train.grad_clip == 1.0, name
        assert t.train.eval_max_tokens is None  # the final bpb scores the whole split
        assert t.train.eval_every == t.train.checkpoint_every == 500
        assert t.data.tokenizer == "char" and t.data.source == "/data/sherlock.txt"
        assert (t.num_workers, t.cpus_per_worker, t.use_gpu) == (1, 2, False), name
        assert t.experiment == "quality-gap" and t.recipe == name
        assert t.run_name.startswith(f"micro-{name}-s0-")
    assert len({t.key() for t in trials.values()}) == len(ALL)


def test_each_trial_carries_its_recipe(trials):
    for name, r in RECIPES.items():
        t = trials[name]
        assert (t.block, t.scheme) == (r.block, r.scheme), name
        assert t.plan == PrecisionPlan.from_config(r.plan), name
        for field, value in r.train.items():
            assert getattr(t.train, field) == value, (name, field)
    assert trials["bitnet_b158"].train.schedule == "two_stage"
    assert trials["trilm"].plan.activation_bits is None
    assert trials["paretoq"].train.min_lr_ratio == 0.0  # the recipe's, over the shared 0.1
    assert trials["fp"].train.min_lr_ratio == 0.1
    # absmean is the fp trial under all_ternary: nothing else differs.
    fp, absmean = trials["fp"].identity(), trials["absmean"].identity()
    assert {k for k in fp if fp[k] != absmean[k]} == {"plan"}
    assert trials["absmean"].plan == PrecisionPlan.from_config("all_ternary")
    assert trials["absmean"].scheme == "absmean"


def test_rows_share_every_setting_no_recipe_sets(trials):
    def shared(t):
        d = t.to_dict()
        for k in RECIPE_FIELDS:
            d.pop(k)
        d["train"] = {k: v for k, v in d["train"].items() if k not in RECIPE_TRAIN_FIELDS}
        return d

    first = shared(trials["fp"])
    for name, t in trials.items():
        assert shared(t) == first, name


def test_trials_are_the_studys_recipe_cells():
    """The same shared settings as a study's `trial` give the study's trials, field for field."""
    base = qg.shared_trial(2000, 1e-3, "/data/sherlock.txt")
    ours = qg.build_trials(ALL, base)
    trial = {k: v for k, v in base.items() if k not in ("size", "seed")}
    trial["train"] = {k: v for k, v in base["train"].items()
                      if k not in ("steps", "warmup_steps", "eval_every", "checkpoint_every",
                                   "log_every")}
    budget = {"sizes": ["micro"], "tokens": 2000 * 12 * 64, "warmup_fraction": 0.05,
              "evals_per_trial": 4, "trial": trial}
    cells = StudyConfig(name="gap", recipes=list(RECIPES), **budget).cells()
    for name in RECIPES:
        (t,) = cells[f"micro/{name}"]
        assert t.to_dict() == ours[name].to_dict(), name
    cells = StudyConfig(name="gap", schemes=["absmean"], plans=["all_ternary"], **budget).cells()
    (t,) = cells["micro/absmean/all_ternary"]
    assert t.key() == ours["absmean"].key()


def test_short_budgets_scale_warmup_and_evaluations():
    train = qg.shared_trial(20, 3e-3, "x.txt")["train"]
    assert (train["steps"], train["lr"], train["warmup_steps"]) == (20, 3e-3, 1)
    assert train["eval_every"] == train["checkpoint_every"] == 5 and train["log_every"] == 5
    trials = qg.build_trials(ALL, qg.shared_trial(20, 1e-3, "x.txt"))
    assert all(t.train.steps == 20 for t in trials.values())


@pytest.mark.parametrize("argv, message", [
    (["--recipes", "fp,bitnet"], "unknown recipe 'bitnet' in --recipes; choose from fp, paper, "
     "bitnet_b158, trilm, paretoq, absmean"),
    (["--recipes", " , "], "--recipes is empty"),
    (["--recipes", "fp,fp"], "names a recipe twice"),
    (["--steps", "0"], "steps must be a positive number, got 0"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--data", "/no/such/book.txt"], "--data /no/such/book.txt is not a file"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, corpus, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a trial ran on bad input")

    monkeypatch.setattr("ternarylm.training.trial.run_trial", never)
    if "--data" not in argv:
        argv = [*argv, "--data", str(corpus)]
    assert qg.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("quality_gap: error: "), err
    assert message in err


def _row(recipe, bpb, sparsity=None, status="FINISHED"):
    return {"recipe": recipe, "val_bpb": bpb, "sparsity": sparsity, "status": status,
            "wall_s": 10.0, "cached": False}


def test_gaps_and_verdict():
    rows = [_row("fp", 2.0), _row("absmean", 2.067, 0.31), _row("paretoq", 2.03, 0.4),
            _row("trilm", None, status="FAILED"), _row("paper", 2.1, 0.2)]
    summary = qg.add_gaps(rows)
    gaps = {r["recipe"]: r["gap_bpb"] for r in rows}
    assert gaps["fp"] == 0 and gaps["trilm"] is None
    assert gaps["absmean"] == pytest.approx(0.067) and gaps["paper"] == pytest.approx(0.1)
    assert summary["narrowest"] == "paretoq" and summary["fp_val_bpb"] == 2.0
    assert summary["narrows_absmean_by_bpb"] == pytest.approx(0.037)
    line = qg.verdict(summary)
    assert line.startswith("narrowest gap to fp: paretoq (+0.0300 bpb)")
    assert "paretoq narrows it by 0.0370 bpb" in line
    table = qg.table(rows).splitlines()
    assert table[0] == "| recipe | val bpb | gap to fp (bpb) | sparsity | wall s | status |"
    assert table[4] == "| paretoq | 2.0300 | +0.0300 | 0.400 | 10 | FINISHED |"
    assert table[5] == "| trilm | - | - | - | 10 | FAILED |"

    worse = [_row("fp", 2.0), _row("absmean", 2.05, 0.3), _row("paper", 2.1, 0.2)]
    assert "no recipe narrows plain absmean's gap" in qg.verdict(qg.add_gaps(worse))
    no_fp = [_row("absmean", 2.05, 0.3)]
    assert qg.add_gaps(no_fp)["narrowest"] is None and no_fp[0]["gap_bpb"] is None
    assert qg.verdict(qg.add_gaps(no_fp)).startswith("no gap: the fp trial is not among")
