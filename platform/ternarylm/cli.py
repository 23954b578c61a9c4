"""The `ternarylm` console command."""

from __future__ import annotations

import argparse
import json
import sys

from ternarylm.plans import PRESETS


def _describe(args: argparse.Namespace) -> None:
    from ternarylm.analysis import describe
    from ternarylm.model import model_config
    from ternarylm.plans import preset

    overrides = {k: v for k, v in (("vocab_size", args.vocab), ("seq_len", args.seq_len)) if v}
    info = {"size": args.size, "plan": args.plan, "scheme": args.scheme,
            **describe(model_config(args.size, **overrides), preset(args.plan), args.scheme)}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")


def _train(args: argparse.Namespace) -> None:
    from ternarylm.config import TrialConfig
    from ternarylm.trial import run_trial

    result = run_trial(TrialConfig.from_yaml(args.config))
    print(json.dumps({"run_id": result.run_id, "key": result.key, "status": result.status,
                      "skipped": result.skipped, "seconds": result.seconds,
                      "metrics": result.metrics}))


def _fit(args: argparse.Namespace) -> None:
    from ternarylm.fit import fit_csv

    fit = fit_csv(args.csv, n_boot=args.bootstrap, seed=args.seed)
    if args.json:
        print(json.dumps(fit.to_json()))
        return
    print(f"{fit.form} fitted on {fit.n_points} points")
    for name, value in fit.params.items():
        low, high = fit.ci.get(name, (float("nan"), float("nan")))
        print(f"{name:>6} = {value:.6g}   95% CI [{low:.6g}, {high:.6g}]")


def build_parser() -> argparse.ArgumentParser:
    from ternarylm.model import SIZES
    from ternarylm.quantizers import TERNARY_SCHEMES

    parser = argparse.ArgumentParser(prog="ternarylm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="parameter counts, FLOPs and memory of a size and plan")
    p.add_argument("--size", required=True, choices=list(SIZES))
    p.add_argument("--plan", default="all_ternary", choices=list(PRESETS))
    p.add_argument("--scheme", default="absmean", choices=list(TERNARY_SCHEMES))
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the size's, 30,522)")
    p.add_argument("--seq-len", type=int, help="context length used for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_describe)

    p = sub.add_parser("train", help="train one model (one trial) from a YAML config")
    p.add_argument("--config", required=True, help="YAML file of trial settings")
    p.set_defaults(func=_train)

    p = sub.add_parser("fit", help="fit L(N) = E + A N^-alpha (+ B D^-beta) to a CSV of N, D, loss")
    p.add_argument("csv", help="CSV with columns N, loss and optionally D")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # our config errors: one clear line, no traceback
        print(f"ternarylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
