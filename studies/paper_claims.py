"""The TernaryLM paper's five claims, re-measured, with a verdict per claim (studies/claims.py).

    python studies/paper_claims.py                          # --preset laptop: 2 CPU cores
    python studies/paper_claims.py --preset paper --dry-run # the paper's scale: trials, GPU-hours
    ray job submit --working-dir . -- python studies/paper_claims.py --preset paper

Three studies (quality: claims 1-3, overfit: claim 4, depth: claim 5) run on Ray Tune; the
quality study's models are then fine-tuned on MRPC (claim 2) and packed and timed beside
paper-132m (claim 3). The report (claims.md, claims.json) is logged on every study's MLflow
parent run and printed at the end. Presets: studies/configs/claims_<preset>.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from scaling import print_table, shared_sample

from claims import ClaimsConfig, plan_power, run_claims
from ternarylm.config import ConfigError, load_yaml
from ternarylm.core.errors import UserError
from ternarylm.orchestration.study import trial_table
from ternarylm.tracking import quiet_mlflow

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = sorted(p.stem.removeprefix("claims_") for p in CONFIGS.glob("claims_*.yaml"))


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit status 2, like every other bad input."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_claims(args: argparse.Namespace) -> ClaimsConfig:
    if args.config is None and args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)} "
                          f"or pass --config FILE")
    raw = load_yaml(args.config or CONFIGS / f"claims_{args.preset}.yaml")
    # The laptop preset reads the shared data beside the repository when it is there:
    # <shared>/tinystories/tinystories_sample.txt and <shared>/glue/MRPC.
    sample = shared_sample() if args.preset == "laptop" and not args.config else None
    corpus = args.data or sample
    if corpus:
        raw.setdefault("trial", {}).setdefault("data", {})["source"] = str(corpus)
    if sample is not None and (sample.parents[1] / "glue").is_dir() \
            and raw.get("glue_data_dir") is None:
        raw["glue_data_dir"] = str(sample.parents[1] / "glue")
    if args.name:
        raw["name"] = args.name
    return ClaimsConfig.from_dict(raw)


def dry_run(claims: ClaimsConfig, as_json: bool) -> None:
    out = {"name": claims.name, "protocol": claims.protocol, "studies": {}}
    if claims.protocol:
        print(f"protocol: {claims.protocol}")
    for key, study in claims.studies.items():
        rows = trial_table(study)
        print(f"\n{key} ({study.name}):")
        print_table(rows)
        out["studies"][key] = {"name": study.name, "sizes": study.sizes,
                               "seeds": study.seeds, "trials": len(rows),
                               "tokens": sum(r["tokens"] for r in rows),
                               "gpu_hours": sum(r["gpu_hours"] for r in rows), "rows": rows}
    # A trial two studies share (same config, same key) trains once: count it once.
    distinct = {r["key"] or f"{k}-{i}": r for k, s in out["studies"].items()
                for i, r in enumerate(s["rows"])}  # no key: a final trial after an lr search
    out["trials"] = len(distinct)
    out["tokens"] = sum(r["tokens"] for r in distinct.values())
    out["gpu_hours"] = sum(r["gpu_hours"] for r in distinct.values())
    shared = sum(s["trials"] for s in out["studies"].values()) - out["trials"]
    print(f"\nall studies: {out['trials']} distinct trials ({shared} shared between studies), "
          f"{out['tokens']:,} training tokens, {out['gpu_hours']:.3g} GPU-hours at the assumed "
          f"MFU; then fine-tuning of every finished FP and ternary seed of the quality study on "
          f"{', '.join(claims.glue_tasks)} under fine-tuning seeds {claims.finetune_seeds}, and "
          f"packing, peak memory ({claims.peak_repeats} processes per model) and batch-1 "
          f"decoding ({claims.decode_tokens} tokens) of the trained models and of "
          f"{claims.footprint_size} on the CPU")
    if as_json:
        print(json.dumps(out))


def read_report(path: str) -> dict | None:
    """A previous run's claims.json, or None for no path."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--plan-power {path}: not a readable claims.json ({e})") from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="laptop", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--config", help="your own claims YAML (instead of a preset)")
    parser.add_argument("--data", help="corpus for every study: a .txt/.jsonl/.parquet file or a "
                                       "hub dataset id")
    parser.add_argument("--name", help="name prefix of the studies (a rerun continues them)")
    parser.add_argument("--storage-path", default=os.environ.get("TERNARYLM_STORAGE_PATH"),
                        help="Ray Train/Tune storage (local path, s3:// or gs://)")
    parser.add_argument("--dry-run", action="store_true", help="print the trial tables only")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--plan-power", nargs="?", const="", metavar="CLAIMS_JSON",
                        help="print the seeds each claim's test needs and their cost (dry run), "
                             "from a previous run's claims.json if given, else from assumed "
                             "spreads; runs nothing")
    args = parser.parse_args(argv)
    quiet_mlflow()
    start = time.perf_counter()
    try:
        claims = load_claims(args)
        if args.plan_power is not None:
            print("\n".join(plan_power(claims, read_report(args.plan_power))))
            return 0
        if args.dry_run:
            dry_run(claims, args.json)
            return 0
        result = run_claims(claims, args.storage_path)
        import ray

        ray.shutdown()  # flushes the workers' forwarded logs, so the report comes last
    except UserError as e:  # every config/data error is one clear line
        print(f"paper_claims.py: error: {e}", file=sys.stderr)
        return 2
    print("\n" + result["markdown"])
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps({**result["report"], "errors": result["errors"]}, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
