"""The quality gap of each recipe to the FP trial, at nanoGPT's CPU "baby GPT" budget.

Issue "Anchor recipes": at that budget our all_ternary absmean trial ends 0.067 bits per byte
behind the same FP trial. This runs one real trial per recipe (ternarylm.model.recipes, plus
`absmean`: the plain all_ternary absmean trial that figure is about) on the Sherlock Holmes
text, one after another, through the project's trial path (`ternarylm.training.trial.run_trial`: Ray
Train, one worker of 2 CPUs, DeepSpeed, MLflow), and prints each recipe's final validation bits
per byte, its gap to `fp`, its ternary sparsity and its wall time, then which recipe narrows
the gap most.

The budget, nanoGPT's `train_shakespeare_char.py` as its README runs it on a CPU (--n_layer=4
--n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0): size `micro` (4 blocks x 128 wide, 4 heads), 64-token context, batch 12,
2000 steps, byte-level (`char`) tokens, 90/10 train/validation split (the tail of the book).
Its optimiser settings that no recipe sets are shared by every trial: peak learning rate 1e-3,
cosine to 1e-4 (min_lr_ratio 0.1), 100 warmup steps (5% of the steps), AdamW betas (0.9, 0.99),
gradient clip 1.0. The blocks stay ternarylm's (RMSNorm, rotary, SwiGLU; untied head), not
nanoGPT's GPT-2 blocks. Each recipe then brings its block, scheme, plan, schedule and weight
decay, merged into the shared trial exactly as a study merges them (`ternarylm.orchestration.study.merge`);
`absmean` brings only scheme absmean and plan all_ternary, so it is the `fp` trial but for its
precision plan (both keep the default weight decay 0.01 and cosine schedule).

Val bpb is the trial's own `final/val/bpb`, from an evaluation at the last step over the whole
validation split (eval_max_tokens unset: every target token of the split's ~59k scored once).
There are 4 evaluations per trial (every steps/4, a checkpoint with each).

    python benchmarks/quality_gap.py                          # all six, 2000 steps each
    python benchmarks/quality_gap.py --recipes fp,absmean --steps 20 --json

A trial already finished in the tracking store with the same settings is read back, not
trained again (its row says `cached`, its wall time is the earlier run's training loop). Runs
go to the MLflow experiment `quality-gap` of $MLFLOW_TRACKING_URI, else of the local store
under $TERNARYLM_HOME. A trial that diverges is a row with status FAILED and no bpb.
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import time
from pathlib import Path
from typing import Any

from ternarylm.core import metrics as M
from ternarylm.config import TrialConfig
from ternarylm.core.errors import UserError
from ternarylm.analysis.frontier import markdown
from ternarylm.model.recipes import RECIPES, recipe_overrides
from ternarylm.orchestration.study import merge

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
SHERLOCK = SHARED_DATA / "gutenberg" / "adventures_of_sherlock_holmes.txt"

ABSMEAN = "absmean"
"""The plain all_ternary absmean trial: the `fp` recipe's trial under the all_ternary plan."""
DEFAULT_RECIPES = [*RECIPES, ABSMEAN]
BASELINE = "fp"
EXPERIMENT = "quality-gap"

# nanoGPT's CPU baby GPT (config/train_shakespeare_char.py with the README's CPU flags).
BABY_GPT = {"size": "micro", "seq_len": 64, "micro_batch": 12, "steps": 2000, "lr": 1e-3,
            "min_lr_ratio": 0.1, "warmup_steps": 100, "betas": [0.9, 0.99], "grad_clip": 1.0,
            "dropout": 0.0}
EVALS_PER_TRIAL = 4
COLUMNS = ("recipe", "val bpb", "gap to fp (bpb)", "sparsity", "wall s", "status")


class QualityGapError(UserError):
    """Bad arguments to this benchmark."""


def parse_recipes(text: str) -> list[str]:
    """Comma-separated recipe names, each a recipe of ternarylm.model.recipes or `absmean`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QualityGapError(f"--recipes is empty; give comma-separated names from "
                              f"{', '.join(DEFAULT_RECIPES)}")
    unknown = [n for n in names if n not in DEFAULT_RECIPES]
    if unknown:
        raise QualityGapError(f"unknown recipe {unknown[0]!r} in --recipes; choose from "
                              f"{', '.join(DEFAULT_RECIPES)}")
    if len(set(names)) != len(names):
        raise QualityGapError(f"--recipes names a recipe twice ({text}); name each once")
    return names


def shared_trial(steps: int, lr: float, data: str, seed: int = 0,
                 experiment: str = EXPERIMENT) -> dict[str, Any]:
    """The trial settings every recipe shares: the baby-GPT budget on `data`, 2 threads."""
    b = BABY_GPT
    every = max(1, steps // EVALS_PER_TRIAL)
    warmup = min(b["warmup_steps"], steps * b["warmup_steps"] // b["steps"])  # 5% of the steps
    return {"size": b["size"], "seq_len": b["seq_len"], "dropout": b["dropout"], "seed": seed,
            "data": {"source": data, "tokenizer": "char"},
            "train": {"steps": steps, "micro_batch": b["micro_batch"], "lr": lr,
                      "min_lr_ratio": b["min_lr_ratio"], "warmup_steps": warmup,
                      "betas": list(b["betas"]), "grad_clip": b["grad_clip"],
                      "eval_every": every, "checkpoint_every": every,
                      "log_every": min(10, every), "eval_max_tokens": None},
            "num_workers": 1, "cpus_per_worker": 2, "experiment": experiment}


def overrides(name: str) -> dict[str, Any]:
    """The trial overrides of one row, labelled with its name, as a study's recipe cell."""
    if name == ABSMEAN:
        return {"scheme": "absmean", "plan": "all_ternary", "recipe": ABSMEAN}
    return recipe_overrides(name) | {"recipe": name}


def build_trials(names: list[str], shared: dict[str, Any]) -> dict[str, TrialConfig]:
    """Every row's TrialConfig, all validated before anything runs."""
    return {name: TrialConfig.from_dict(merge(shared, overrides(name))) for name in names}


def row_of(name: str, result, wall_s: float) -> dict[str, Any]:
    m = result.metrics
    return {"recipe": name, "status": result.status, "run_id": result.run_id,
            "key": result.key, "cached": result.skipped,
            "val_bpb": m.get(M.VAL_BPB), "val_loss": m.get(M.VAL_LOSS),
            "sparsity": m.get(M.SPARSITY),
            # A cached trial trained earlier: its training loop's time, not this process's.
            "wall_s": m.get(M.TRAIN_LOOP_S) if result.skipped else wall_s,
            "train_loop_s": m.get(M.TRAIN_LOOP_S)}


def add_gaps(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each row's gap to `fp` (bpb) and the verdict: the narrowest gap among ternary rows, and
    whether it beats plain absmean's."""
    fp = next((r["val_bpb"] for r in rows if r["recipe"] == BASELINE), None)
    for r in rows:
        r["gap_bpb"] = (r["val_bpb"] - fp if fp is not None and r["val_bpb"] is not None
                        else None)
    ternary = [r for r in rows if r["recipe"] != BASELINE and r["gap_bpb"] is not None]
    best = min(ternary, key=lambda r: r["gap_bpb"], default=None)
    absmean = next((r["gap_bpb"] for r in ternary if r["recipe"] == ABSMEAN), None)
    return {"fp_val_bpb": fp, "narrowest": best["recipe"] if best else None,
            "narrowest_gap_bpb": best["gap_bpb"] if best else None, "absmean_gap_bpb": absmean,
            "narrows_absmean_by_bpb": (absmean - best["gap_bpb"]
                                       if best and absmean is not None else None)}


def verdict(summary: dict[str, Any]) -> str:
    if summary["fp_val_bpb"] is None:
        return "no gap: the fp trial is not among --recipes (or failed)"
    if summary["narrowest"] is None:
        return "no gap: no ternary trial finished"
    line = (f"narrowest gap to fp: {summary['narrowest']} "
            f"({summary['narrowest_gap_bpb']:+.4f} bpb)")
    if summary["absmean_gap_bpb"] is not None and summary["narrowest"] != ABSMEAN:
        by = summary["narrows_absmean_by_bpb"]
        line += (f"; plain absmean's gap is {summary['absmean_gap_bpb']:+.4f}, so "
                 + (f"{summary['narrowest']} narrows it by {by:.4f} bpb" if by > 0
                    else "no recipe narrows it"))
    elif summary["narrowest"] == ABSMEAN:
        line += "; no recipe narrows plain absmean's gap"
    return line


def table(rows: list[dict[str, Any]]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return markdown([{"recipe": r["recipe"], "val bpb": num(r["val_bpb"], ".4f"),
                      "gap to fp (bpb)": num(r["gap_bpb"], "+.4f"),
                      "sparsity": num(r["sparsity"], ".3f"), "wall s": num(r["wall_s"], ".0f"),
                      "status": r["status"] + (" (cached)" if r["cached"] else "")}
                     for r in rows], COLUMNS)


def run(trials: dict[str, TrialConfig], tracking_uri: str | None,
        quiet: bool) -> list[dict[str, Any]]:
    from ternarylm.training.trial import TrialFailed, run_trial

    rows = []
    for i, (name, cfg) in enumerate(trials.items(), 1):
        if not quiet:
            print(f"[{i}/{len(trials)}] {name}: {cfg.run_name} ({cfg.train.steps} steps)",
                  flush=True)
        start = time.perf_counter()
        try:
            result = run_trial(cfg, tracking_uri=tracking_uri)
        except TrialFailed as e:  # diverged or workers kept failing: a row, not the end
            print(f"[{i}/{len(trials)}] {name}: {e}", file=sys.stderr, flush=True)
            rows.append({"recipe": name, "status": "FAILED", "run_id": None,
                         "key": cfg.key(), "cached": False, "val_bpb": None, "val_loss": None,
                         "sparsity": None, "wall_s": time.perf_counter() - start,
                         "train_loop_s": None, "error": str(e)})
            continue
        rows.append(row_of(name, result, time.perf_counter() - start))
        if not quiet:
            r = rows[-1]
            print(f"[{i}/{len(trials)}] {name}: val bpb {r['val_bpb']:.4f} in "
                  f"{r['wall_s']:.0f} s{' (cached)' if r['cached'] else ''}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated (default {','.join(DEFAULT_RECIPES)})")
    parser.add_argument("--steps", type=int, default=BABY_GPT["steps"],
                        help="optimizer steps per trial (default 2000, nanoGPT's max_iters)")
    parser.add_argument("--lr", type=float, default=BABY_GPT["lr"],
                        help="peak learning rate of every trial (default 1e-3, nanoGPT's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHERLOCK),
                        help="a .txt file (default: the shared Sherlock Holmes text)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                        "$MLFLOW_TRACKING_URI, else the local store under $TERNARYLM_HOME)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment name")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage and one error line on stderr, status 2
        return int(e.code or 0)
    from ternarylm.tracking import quiet_mlflow

    quiet_mlflow()
    try:
        names = parse_recipes(args.recipes)
        if not Path(args.data).is_file():
            raise QualityGapError(f"--data {args.data} is not a file; pass the Sherlock Holmes "
                                  f".txt or set TERNARYLM_SHARED_DATA to the shared data folder")
        args.data = str(Path(args.data).resolve())  # workers read it from their own cwd
        shared = shared_trial(args.steps, args.lr, args.data, args.seed, args.experiment)
        trials = build_trials(names, shared)
        if not args.json:
            first = next(iter(trials.values()))
            print(f"quality gap at the baby-GPT budget: size {first.size}, seq {first.seq_len}, "
                  f"batch {first.train.micro_batch}, {args.steps} steps, lr {args.lr:g}, "
                  f"data {args.data}; experiment {args.experiment}", flush=True)
        rows = run(trials, args.tracking_uri, args.json)
    except UserError as e:  # bad input: one clear line, no traceback, nothing trained
        print(f"quality_gap: error: {e}", file=sys.stderr)
        return 2
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()  # flushes workers' forwarded logs: our lines come last
    summary = add_gaps(rows)
    if args.json:
        print(json.dumps({"recipes": rows, **summary, "steps": args.steps, "lr": args.lr,
                          "seed": args.seed, "data": args.data, "experiment": args.experiment,
                          "shared_trial": shared, "eval": "whole validation split"}))
    else:
        print(table(rows), end="")
        print(verdict(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
