"""Trials trained alone against trials trained in cohorts, side by side in one run.

For each size and cohort size N, the same N trials (the `local` preset's settings, seeds
0..N-1 of one plan) run as a study twice, in fresh MLflow stores: with `--no-cohorts` (N worker
groups, N engines) and with cohorts (one worker group, one engine of N members). Each study is
`studies/scaling.py` in its own process; set RAY_ADDRESS to a running cluster to keep its
start-up out of the wall times. Per mode it reports:

    wall_s               the study's wall time (process start to end)
    trials_per_hour      N / wall_s x 3600
    step_s_per_member    the training loop's seconds (evaluations included) per step, per
                         trial (a cohort's loop time shared by its members)
    outside_loop_s       per trial: the study's view of the trial's wall time less its loop
                         (a cohort's launch shared by its members)
    val_bpb              each trial's final validation bits per byte, by seed

    python benchmarks/cohort.py --json                         # pico..mini x 1, 3, 5, 8
    python benchmarks/cohort.py --sizes pico --members 2 --tokens 6144   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "studies"))


def study_config(path: Path, size: str, members: int, plan: str, tokens: int | None) -> Path:
    """The local preset narrowed to one size and plan, seeds 0..members-1, one cohort."""
    import scaling

    raw = yaml.safe_load((scaling.CONFIGS / "local.yaml").read_text())
    sample = scaling.shared_sample()
    if sample:
        raw["trial"]["data"]["source"] = str(sample)
    raw |= {"name": f"bench-{size}-{members}", "sizes": [size], "plans": [plan],
            "schemes": ["absmean"], "seeds": list(range(members)), "cohort_size": members}
    if tokens:
        raw["tokens"] = tokens
    path.write_text(yaml.safe_dump(raw))
    return path


def run_mode(config: Path, directory: Path, cohorts: bool) -> dict:
    """One study in a fresh store; its wall time and per-trial figures from MLflow."""
    from mlflow.tracking import MlflowClient

    from ternarylm.core import metrics as M

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    args = [sys.executable, str(REPO / "studies" / "scaling.py"), "--config", str(config),
            "--storage-path", str(directory / "runs"), "--json"]
    started = time.perf_counter()
    out = subprocess.run(args + ([] if cohorts else ["--no-cohorts"]), capture_output=True,
                         text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"cohort.py: the study failed ({config}): {out.stderr.strip()[-500:]}")
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("ternarylm").experiment_id])
            if "ternarylm.trial_key" in r.data.tags]
    share = len(runs) if cohorts else 1  # one launch and one loop for the cohort's members
    finals = [M.finals(r.data.metrics) for r in runs]
    steps = int(runs[0].data.params["train.steps"])
    return {"wall_s": wall, "trials_per_hour": len(runs) / wall * 3600,
            "step_s_per_member": statistics.median(f[M.TRAIN_LOOP_S] for f in finals)
            / steps / share,
            "outside_loop_s": statistics.median(f[M.OUTSIDE_TRAINING_S] for f in finals) / share,
            "val_bpb": {r.data.params["seed"]: M.finals(r.data.metrics)[M.VAL_BPB]
                        for r in runs}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="pico,tiny,micro,mini")
    parser.add_argument("--members", default="1,3,5,8", help="cohort sizes (trials per case)")
    parser.add_argument("--plan", default="all_ternary")
    parser.add_argument("--tokens", type=int, help="training tokens per trial (default: the "
                                                   "local preset's)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    try:
        members = [int(m) for m in args.members.split(",")]
    except ValueError:
        members = []
    if not members or min(members) < 1:
        print(f"cohort.py: error: --members {args.members!r}: give positive integers, e.g. "
              f"1,3,5,8", file=sys.stderr)
        return 2
    cases = []
    for size in args.sizes.split(","):
        for n in members:
            with tempfile.TemporaryDirectory() as d:
                config = study_config(Path(d) / "study.yaml", size, n, args.plan, args.tokens)
                case = {"size": size, "members": n}
                for mode, cohorts in (("solo", False), ("cohort", True)):
                    (Path(d) / mode).mkdir()
                    case[mode] = run_mode(config, Path(d) / mode, cohorts)
            case["speedup"] = case["cohort"]["trials_per_hour"] / case["solo"]["trials_per_hour"]
            cases.append(case)
            print(f"{size:>6} x{n}: solo {case['solo']['trials_per_hour']:7.1f} trials/h "
                  f"({case['solo']['step_s_per_member'] * 1e3:.1f} ms/step, outside "
                  f"{case['solo']['outside_loop_s']:.1f} s)  cohort "
                  f"{case['cohort']['trials_per_hour']:7.1f} trials/h "
                  f"({case['cohort']['step_s_per_member'] * 1e3:.1f} ms/step/member, outside "
                  f"{case['cohort']['outside_loop_s']:.1f} s/trial)  x{case['speedup']:.2f}",
                  flush=True)
    if args.json:
        print(json.dumps({"plan": args.plan, "tokens": args.tokens, "cases": cases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
