"""Where one small trial's wall time goes, on the path a study runs it.

Runs the `local` preset's smallest cell (pico, fp plan; `--size`, `--plan` pick another) as a
one-trial study (Ray Tune -> the trial's driver -> Ray Train -> a DeepSpeed worker -> MLflow), in
a fresh MLflow store and storage folder so that nothing is skipped, then reads the phases back
from the metrics the trial logged:

    Tune start       Tune's trial actor started until the trial's driver code runs
    driver setup     checks, data cache, MLflow run (time/setup_s)
    worker launch    fit() called until the worker's entry: Ray Train's controller, placement,
                     worker actors, process group (time/worker_start_s)
    worker init      imports, data, DeepSpeed engine, checkpoint restore (time/worker_init_s)
    training loop    steps and evaluations (time/train_loop_s)
    worker export    final model and packed file written and logged (time/worker_export_s)
    teardown         the worker's end until fit() returns (Ray Train's shutdown)
    driver finish    plots, run closed (time/finish_s)

`--seeds K` runs K trials one after another and reports the median of each phase (the first
trial's worker also loads what later ones find in the OS's file cache).

    python benchmarks/trial_phases.py            # one pico trial
    python benchmarks/trial_phases.py --json     # last line: one JSON object
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "studies"))

PHASES = ("tune_start", "driver_setup", "worker_launch", "worker_init", "training_loop",
          "worker_export", "teardown", "driver_finish")


def phases(finals: dict[str, float]) -> dict[str, float]:
    """The phases of one trial from its latest metric values (keyed by metric name)."""
    from ternarylm.core import metrics as M

    setup, fit, finish = finals[M.SETUP_S], finals[M.FIT_S], finals[M.FINISH_S]
    inside_fit = {"worker_launch": finals[M.WORKER_START_S], "worker_init": finals[M.WORKER_INIT_S],
                  "training_loop": finals[M.TRAIN_LOOP_S],
                  "worker_export": finals[M.WORKER_EXPORT_S]}
    return {"tune_start": finals[M.TRIAL_WALL_S] - setup - fit - finish, "driver_setup": setup,
            **inside_fit, "teardown": fit - sum(inside_fit.values()), "driver_finish": finish}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="pico")
    parser.add_argument("--plan", default="fp")
    parser.add_argument("--seeds", type=int, default=1, help="trials run one after another")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        print("trial_phases.py: error: --seeds must be >= 1", file=sys.stderr)
        return 2

    import ray
    import scaling

    from ternarylm import tracking
    from ternarylm.core.errors import UserError
    from ternarylm.orchestration.study import run_study

    with tempfile.TemporaryDirectory() as d:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
        study_args = argparse.Namespace(config=None, preset="local", data=None, name="phases",
                                        lr_search=None)
        try:
            study = scaling.load_study(study_args)
        except UserError as e:
            print(f"trial_phases.py: error: {e}", file=sys.stderr)
            return 2
        study.sizes, study.plans, study.seeds = [args.size], [args.plan], list(range(args.seeds))
        study.max_concurrent = 1
        study.cohorts = False  # one trial per launch: the path whose phases this measures
        study.__post_init__()  # validates the changed grid
        started = time.perf_counter()
        summary = run_study(study, storage_path=f"{d}/runs")
        wall = time.perf_counter() - started
        ray.shutdown()
        rows = [phases(tracking.client().get_run(r["run_id"]).data.metrics)
                for r in summary["rows"] if r["status"] == "FINISHED"]
    if len(rows) != args.seeds:
        print(f"trial_phases.py: error: {args.seeds - len(rows)} trial(s) did not finish",
              file=sys.stderr)
        return 1
    median = {p: statistics.median(r[p] for r in rows) for p in PHASES}
    print(f"\n{'phase':>14} " + " ".join(f"{f'seed {i}':>8}" for i in range(len(rows)))
          + f" {'median':>8}")
    for p in PHASES:
        print(f"{p:>14} " + " ".join(f"{r[p]:8.1f}" for r in rows) + f" {median[p]:8.1f}")
    outside = sum(v for p, v in median.items() if p != "training_loop")
    print(f"outside the training loop (median trial): {outside:.1f} s; study wall time "
          f"{wall:.1f} s for {len(rows)} trial(s)")
    if args.json:
        print(json.dumps({"size": args.size, "plan": args.plan, "trials": rows,
                          "median": median, "outside_loop_s": outside, "study_wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
