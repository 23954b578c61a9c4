"""The main study: model sizes x ternary scaling-factor schemes x precision plans, on Ray Tune.

    python studies/scaling.py                    # --preset local: a real small study on a laptop
    python studies/scaling.py --dry-run --json   # the trial table, without starting Ray
    python studies/scaling.py --lr-search 0.001,0.003,0.01   # a learning-rate search per cell
    ray job submit --working-dir . -- python studies/scaling.py --preset ladder

Results go to MLflow ($MLFLOW_TRACKING_URI, default a SQLite store in ~/.ternarylm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ray

from ternarylm.cli import OneLineParser, exit_status
from ternarylm.core.errors import UserError
from ternarylm.orchestration.study import StudyConfig, run_study, trial_table
from ternarylm.tracking import quiet_mlflow

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("claims_"))
LAPTOP_PRESETS = ("local", "frontier", "recipes")


def shared_sample() -> Path | None:
    """The TinyStories sample shipped beside this repository, if present."""
    root = Path(os.environ.get("TERNARYLM_SHARED_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))
    sample = root / "tinystories" / "tinystories_sample.txt"
    return sample if sample.is_file() else None


def load_study(args: argparse.Namespace) -> StudyConfig:
    from ternarylm.config import load_yaml
    from ternarylm.config import _build

    raw = load_yaml(args.config or CONFIGS / f"{args.preset}.yaml")
    data = raw.setdefault("trial", {}).setdefault("data", {})
    # The presets that run on a laptop use the shared TinyStories sample when it is there.
    laptop = args.preset in LAPTOP_PRESETS and not args.config
    corpus = args.data or (shared_sample() if laptop else None)
    if corpus:
        data["source"] = str(corpus)
    if args.name:
        raw["name"] = args.name
    if args.no_cohorts:
        raw["cohorts"] = False
    if args.lr_search:
        raw["lr_search"] = {**(raw.get("lr_search") or {}), "values": _rates(args.lr_search)}
    return _build(StudyConfig, raw, "study")


def _rates(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--lr-search {text!r}: give comma-separated learning rates, e.g. "
                        f"0.001,0.003,0.01") from None


def print_table(rows: list[dict]) -> None:
    print(f"{'role':>6} {'size':>11} {'scheme':>16} {'plan':>15} {'seed':>4} {'lr':>8} "
          f"{'params':>13} {'vocab':>6} {'tokens':>14} {'FLOPs':>10} {'GPU-h':>9}")
    for r in rows:
        lr = "search" if r["lr"] is None else f"{r['lr']:.3g}"
        print(f"{r['role']:>6} {r['size']:>11} {r['scheme']:>16} {r['plan']:>15} {r['seed']:>4} "
              f"{lr:>8} {r['params']:>13,} {r['vocab']:>6} {r['tokens']:>14,} "
              f"{r['flops']:>10.3g} {r['gpu_hours']:>9.3g}")
    for role in ("search", "final"):
        mine = [r for r in rows if r["role"] == role]
        if mine:
            print(f"{len(mine)} {role} trials, {sum(r['gpu_hours'] for r in mine):.3g} GPU-hours "
                  f"at the assumed MFU")
    sources = {r["vocab_source"] for r in rows if "default" in r["vocab_source"]}
    for source in sorted(sources):
        print(f"vocabulary: {source}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="local", choices=PRESETS)
    parser.add_argument("--config", help="your own study YAML (instead of a preset)")
    parser.add_argument("--data", help="corpus for every trial: a .txt/.jsonl/.parquet file or "
                                       "a hub dataset id")
    parser.add_argument("--name", help="study name (a rerun with the same name continues it)")
    parser.add_argument("--storage-path", default=os.environ.get("TERNARYLM_STORAGE_PATH"),
                        help="Ray Train/Tune storage (local path, s3:// or gs://)")
    parser.add_argument("--lr-search", metavar="RATES",
                        help="search these peak learning rates (comma-separated) per cell before "
                             "its trials (sets the study's lr_search values)")
    parser.add_argument("--no-cohorts", action="store_true",
                        help="train each trial alone (default: trials of one shape train "
                             "together, up to the study's cohort_size per worker group)")
    parser.add_argument("--dry-run", action="store_true", help="print the trial table only")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--verbose", action="store_true",
                        help="stream Ray's and DeepSpeed's worker logs to the console")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["TERNARYLM_VERBOSE"] = "1"
    quiet_mlflow()
    return exit_status("scaling.py", args.verbose, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    study = load_study(args)
    if args.dry_run:
        rows = trial_table(study)
        print_table(rows)
        if args.json:
            print(json.dumps(rows))
        return 0
    summary = run_study(study, args.storage_path)
    ray.shutdown()  # flushes the workers' forwarded logs, so the JSON line is the last one
    if args.json:
        keys = ("parent_run_id", "trained", "skipped", "fits", "frontier", "errors", "warnings",
                "lr_search")
        print(json.dumps({k: summary[k] for k in keys}, default=str))
    return 1 if summary["errors"] else 0

if __name__ == "__main__":
    sys.exit(main())
