"""The `ternarylm` console command."""

from __future__ import annotations

import argparse
import json
import sys

from ternarylm.errors import UserError
from ternarylm.plans import PRESETS


def _describe(args: argparse.Namespace) -> None:
    from ternarylm.analysis import describe
    from ternarylm.model import model_config
    from ternarylm.plans import preset

    overrides = {k: v for k, v in (("vocab_size", args.vocab), ("seq_len", args.seq_len))
                 if v is not None}
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

    import ray

    result = run_trial(TrialConfig.from_yaml(args.config))
    ray.shutdown()  # flushes the workers' forwarded logs, so the JSON line is the last one
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


def _glue(args: argparse.Namespace) -> None:
    from ternarylm.glue import GlueSettings, run_glue

    settings = GlueSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            pooling=args.pooling, max_train_examples=args.max_train_examples,
                            max_dev_examples=args.max_dev_examples, seed=args.seed,
                            device=args.device)
    print(json.dumps(run_glue(args.run, args.task, settings, args.data_dir, force=args.force)))


def _pack(args: argparse.Namespace) -> None:
    from ternarylm.packing import pack

    result = pack(args.source, args.out, embedding_dtype=args.embedding_dtype, trits=args.trits)
    print(json.dumps({"path": str(result.path), "bytes": result.bytes, "sha256": result.sha256,
                      "logged_to_run": result.logged_to_run}))


def _generate(args: argparse.Namespace) -> None:
    from ternarylm.generate import generate_text
    from ternarylm.packing import load_packed

    packed = load_packed(args.model)
    completion = generate_text(packed, args.prompt, args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed)
    print(args.prompt + completion)


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

    from ternarylm.glue import POOLINGS, TASKS, GlueSettings

    d = GlueSettings()
    p = sub.add_parser("glue", help="fine-tune a trained model on GLUE MRPC, SST-2 or CoLA and "
                                    "report dev metrics beside the majority-class baseline")
    p.add_argument("--run", required=True, help="pretraining MLflow run id (results are logged "
                   "as its child run) or a local trained-model directory (nothing is logged)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="folder holding MRPC/, SST-2/, CoLA/ GLUE TSVs (default: "
                   "$TERNARYLM_GLUE_DIR, else the hub dataset nyu-mll/glue)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--pooling", default=d.pooling, choices=POOLINGS)
    p.add_argument("--max-train-examples", type=int, help="random subset of the train split")
    p.add_argument("--max-dev-examples", type=int, help="random subset of the dev split")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true",
                   help="fine-tune again even if a finished child run has the same settings")
    p.set_defaults(func=_glue)

    from ternarylm.packing import EMBEDDING_DTYPES

    p = sub.add_parser("pack", help="export a finished trial as one packed file (2-bit ternary "
                                    "codes) for CPU inference")
    p.add_argument("source", help="MLflow run id (the file is also logged to the run under "
                   "packed/) or a trained-model directory")
    p.add_argument("--out", help="output file (default: <source name>.packed.safetensors)")
    p.add_argument("--embedding-dtype", default="int8", choices=EMBEDDING_DTYPES,
                   help="storage of the layers training kept in floating point (embedding and "
                   "head under the usual plans); fp32 keeps logits as trained")
    p.add_argument("--trits", action="store_true",
                   help="5 ternary codes per byte (1.6 bits) instead of 4 (2 bits)")
    p.set_defaults(func=_pack)

    p = sub.add_parser("generate", help="sample text from a packed model on the CPU")
    p.add_argument("--model", required=True, help="packed file written by `ternarylm pack`")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, help="sample among the likeliest tokens whose "
                   "probabilities add up to p (nucleus sampling)")
    p.add_argument("--seed", type=int, help="seed of the sampler, for repeatable output")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ternarylm.tracking import quiet_mlflow

    quiet_mlflow()
    try:
        args.func(args)
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"ternarylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
