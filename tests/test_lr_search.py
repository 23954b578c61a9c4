"""The learning-rate search per study cell: candidates, the winner, edges, the dry run, and a
real search on Ray Tune whose rerun reuses it."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ternarylm import tracking
from ternarylm.config import ConfigError
from ternarylm.orchestration.lr_search import SEARCH_TAG, LRSearchConfig, choose, search_trials
from ternarylm.orchestration.study import (StudyConfig, end_stopped_early, pending_search_trials,
                             trial_table)
from ternarylm.training.trial import open_run

REPO = Path(__file__).resolve().parents[1]


def test_candidates_from_values_or_a_log_grid():
    assert LRSearchConfig(values=[3e-3, 1e-3]).candidates == [1e-3, 3e-3]
    grid = LRSearchConfig(low=1e-4, high=1e-2, num=3).candidates
    assert grid == pytest.approx([1e-4, 1e-3, 1e-2])
    for bad in ({}, {"values": [1e-3]}, {"low": 1e-2, "high": 1e-3}, {"values": [1e-3, 2e-3],
                "budget_fraction": 0}, {"values": [1e-3, 2e-3], "scheduler": "pbt"},
                {"values": [1e-3, 2e-3], "low": 1e-4, "high": 1e-2}):
        with pytest.raises(ConfigError):
            LRSearchConfig(**bad)


def test_winner_is_the_lowest_loss_among_completed_trials():
    candidates = [1e-3, 3e-3, 1e-2, 3e-2]
    # 3e-2 was stopped early (None): its partial loss does not compete.
    choice = choose("nano/-/fp", {1e-3: 2.5, 3e-3: 2.1, 1e-2: 2.3, 3e-2: None}, candidates)
    assert choice.lr == 3e-3 and not choice.at_edge and choice.warning() is None
    assert set(choice.losses) == {1e-3, 3e-3, 1e-2}
    with pytest.raises(ConfigError, match="no search trial completed"):
        choose("nano/-/fp", {1e-3: None, 3e-3: float("nan")}, candidates)


@pytest.mark.parametrize("losses, edge", [({1e-3: 2.0, 3e-3: 2.1, 1e-2: 2.2}, "lowest"),
                                          ({1e-3: 2.2, 3e-3: 2.1, 1e-2: 2.0}, "highest")])
def test_a_winner_at_the_edge_warns(losses, edge):
    choice = choose("tiny/absmean/all_ternary", losses, sorted(losses))
    assert choice.at_edge
    assert f"is the {edge} candidate; widen the range" in choice.warning()


def test_search_trials_are_short_copies_at_each_rate(tinystories):
    study = StudyConfig(sizes=["nano"], schemes=["absmean"], plans=["all_ternary"],
                        seeds=[0, 1], tokens=20480, trial={"seq_len": 64, "data": {
                            "source": str(tinystories), "tokenizer": "char"}},
                        lr_search={"values": [1e-3, 1e-2], "budget_fraction": 0.25})
    final = study.trials()[0]
    searches = search_trials(final, study.search)
    assert [t.train.lr for t in searches] == [1e-3, 1e-2]
    assert all(t.train.steps == -(-final.train.steps // 4) and t.seed == 0 for t in searches)
    assert len({t.key() for t in searches} | {final.key()}) == 3
    rows = trial_table(study)
    assert [r["role"] for r in rows] == ["search", "search", "final", "final"]
    search_cost = sum(r["flops"] for r in rows if r["role"] == "search")
    final_cost = sum(r["flops"] for r in rows if r["role"] == "final")
    assert search_cost == pytest.approx(final_cost / 2 * 2 * 0.25, rel=0.05)


@pytest.mark.slow
def test_search_on_tune_picks_per_cell_and_a_rerun_reuses_it(tmp_path, tinystories, ray_head):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "name": "lrs", "sizes": ["pico"], "schemes": ["absmean"], "plans": ["fp"],
        "seeds": [0], "tokens": 8192, "evals_per_trial": 1, "max_concurrent": 2,
        "lr_search": {"values": [1e-4, 3e-3, 3e-2], "budget_fraction": 0.5,
                      "scheduler": "fifo", "evals": 1},
        "trial": {"seq_len": 64, "num_workers": 1, "max_failures": 0,
                  "data": {"source": str(tinystories), "tokenizer": "char"},
                  "train": {"micro_batch": 8, "eval_max_tokens": 2048,
                            "train_sample_tokens": 1024}}}))
    env = {**os.environ, **ray_head, "MLFLOW_TRACKING_URI": uri}

    def run() -> dict:
        out = subprocess.run([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                              str(config), "--json"], capture_output=True, text=True, env=env,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    cell = first["lr_search"]["pico/-/fp"]
    losses = {float(k): v for k, v in cell["losses"].items()}
    assert len(losses) == 3 and cell["lr"] == min(losses, key=losses.get)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ternarylm")
    runs = client.search_runs([exp.experiment_id])
    searches = [r for r in runs if r.data.tags.get(SEARCH_TAG) == "pico/-/fp"]
    assert len(searches) == 3 and all(r.info.status == "FINISHED" for r in searches)
    parent = next(r for r in runs if r.info.run_name == "study-lrs")
    # Search trials stay out of the results table (hence the fits and the frontier).
    table = client.download_artifacts(parent.info.run_id, "results/results.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 1 and float(rows[0]["lr"]) == cell["lr"]
    markdown = client.download_artifacts(parent.info.run_id, "results/results.md", str(tmp_path))
    header, _, row = Path(markdown).read_text().splitlines()
    assert float(row.split(" | ")[header.split(" | ").index("lr")]) == cell["lr"]
    assert rows[0]["run_id"] not in {r.info.run_id for r in searches}
    assert len(first["trained"]) == 4
    second = run()
    assert second["trained"] == [] and len(second["skipped"]) == 4
    assert second["lr_search"] == first["lr_search"]


def test_a_rerun_trains_only_undecided_search_trials(tinystories, mlflow_uri):
    """Finished and ASHA-stopped search trials are decided; failed, interrupted and new ones are
    trained again."""
    study = StudyConfig(sizes=["nano"], schemes=["absmean"], plans=["all_ternary"], seeds=[0],
                        tokens=20480, trial={"seq_len": 64, "data": {
                            "source": str(tinystories), "tokenizer": "char"}},
                        lr_search={"values": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]})
    trials = search_trials(next(iter(study.cells().values()))[0], study.search)
    endings = [lambda r: tracking.end_run(mlflow_uri, r, "FINISHED"),
               lambda r: end_stopped_early(mlflow_uri, r),
               # The scheduler's words without its tag are not a decision (rules read tags).
               lambda r: tracking.end_run(mlflow_uri, r, "KILLED",
                                          "stopped early by the scheduler"),
               lambda r: tracking.end_run(mlflow_uri, r, "FAILED", "trial errored")]
    for t, end in zip(trials, endings):
        run_id, _ = open_run(t, mlflow_uri, None, {SEARCH_TAG: "nano/absmean/all_ternary"})
        end(run_id)
    pending = pending_search_trials(mlflow_uri, trials)
    assert [t.train.lr for t in pending] == [1e-2, 3e-2, 1e-1]
    # A decided run resumed (here by hand) is no longer decided: its stop reason is cleared.
    tracking.resume_run(mlflow_uri, tracking.find_trial_run(mlflow_uri, trials[1].experiment,
                                                            trials[1].key()).info.run_id)
    assert [t.train.lr for t in pending_search_trials(mlflow_uri, trials)] == [3e-3, 1e-2, 3e-2,
                                                                               1e-1]
