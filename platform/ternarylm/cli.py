"""The `ternarylm` console command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from ternarylm.core.errors import Fault, Interrupted, UserError, one_line
from ternarylm.model.plans import PRESETS

if TYPE_CHECKING:
    from ternarylm.analysis.fit import PrecisionLaw, ScalingFit


def _describe(args: argparse.Namespace) -> None:
    from ternarylm.deploy.footprint import describe
    from ternarylm.model.transformer import model_config
    from ternarylm.model.plans import preset

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
    from ternarylm.training.trial import run_trial

    import ray

    if args.verbose:
        os.environ["TERNARYLM_VERBOSE"] = "1"
    result = run_trial(TrialConfig.from_yaml(args.config))
    ray.shutdown()  # flushes the workers' forwarded logs, so the JSON line is the last one
    print(json.dumps({"run_id": result.run_id, "key": result.key, "status": result.status,
                      "skipped": result.skipped, "seconds": result.seconds,
                      "metrics": result.metrics}))


def _intervals_line(fit: ScalingFit | PrecisionLaw) -> str:
    """How a fit's (ScalingFit or PrecisionLaw) intervals were made, or why it has none."""
    if fit.ci_note:
        return fit.ci_note
    if fit.ci_method is None:
        return "no intervals (--bootstrap 0)"
    return (f"95% CIs: {fit.ci_method} bootstrap (draws keep every N, D and plan); "
            f"{fit.boot_failed:.0%} of refits did not converge")


def _fit_joint(args: argparse.Namespace) -> None:
    from ternarylm.analysis.fit import fit_precision_csv

    law = fit_precision_csv(args.csv, reference=args.reference, n_boot=args.bootstrap,
                            seed=args.seed)
    budgets = [law.at_budget(b, args.tokens, seed=args.seed) for b in args.budget]
    if args.json:
        print(json.dumps({**law.to_json(), "budgets": budgets}))
        return
    print(f"{law.form} fitted on {law.n_points} points, reference {law.reference}, "
          f"residual sd {law.residual_sd:.3g} (log loss)")
    print(_intervals_line(law))
    for name, value in law.params.items():
        low, high = law.ci.get(name, (float("nan"), float("nan")))
        print(f"{name:>16} = {value:.6g}   95% CI [{low:.6g}, {high:.6g}]")
    for b in budgets:
        print(f"at {b['budget_bytes']:,.0f} bytes (best: {b['best']}):")
        for plan, e in b["plans"].items():
            if "loss" not in e:
                print(f"  {plan:>24}: {e['skipped']}")
                continue
            pi = ("   95% CI [{:.4g}, {:.4g}]  PI [{:.4g}, {:.4g}]".format(*e["ci"], *e["pi"])
                  if "pi" in e else "")
            extra = " (extrapolated)" if e["extrapolated"] else ""
            print(f"  {plan:>24}: N {e['N']:,.0f}{extra}   loss {e['loss']:.4g}{pi}")
        if b["best"] in b.get("p_beats", {}):
            odds = ", ".join(f"{y} {p:.2f}" for y, p in b["p_beats"][b["best"]].items())
            print(f"  P({b['best']} beats ...): {odds}")


def _fit(args: argparse.Namespace) -> None:
    from ternarylm.analysis.fit import FitError, fit_csv

    if args.joint:
        return _fit_joint(args)
    if args.budget:
        raise FitError("--budget needs --joint (the precision-aware fit across plans)")
    fit = fit_csv(args.csv, n_boot=args.bootstrap, seed=args.seed)
    if args.json:
        print(json.dumps(fit.to_json()))
        return
    print(f"{fit.form} fitted on {fit.n_points} points")
    print(_intervals_line(fit))
    for name, value in fit.params.items():
        low, high = fit.ci.get(name, (float("nan"), float("nan")))
        print(f"{name:>6} = {value:.6g}   95% CI [{low:.6g}, {high:.6g}]")


def _allocate(args: argparse.Namespace) -> None:
    from ternarylm.orchestration.allocate import allocate, check_out_path, write_plan

    if args.out:
        check_out_path(args.out)  # before minutes of measuring
    allocation = allocate(args.source, args.budget_bits, signal=args.signal, high=args.high,
                          low=args.low, max_tokens=args.max_tokens, name=args.name)
    if args.out:
        write_plan(allocation, args.out)
    print(json.dumps({**allocation.to_json(), "out": args.out}))


def _glue(args: argparse.Namespace) -> None:
    from ternarylm.evaluation.glue import GlueSettings, run_glue

    settings = GlueSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            pooling=args.pooling, max_train_examples=args.max_train_examples,
                            max_dev_examples=args.max_dev_examples, seed=args.seed,
                            device=args.device)
    print(json.dumps(run_glue(args.run, args.task, settings, args.data_dir, force=args.force)))


def _pack(args: argparse.Namespace) -> None:
    from ternarylm.deploy.packing import pack

    result = pack(args.source, args.out, embedding_dtype=args.embedding_dtype, trits=args.trits)
    print(json.dumps({"path": str(result.path), "bytes": result.bytes, "sha256": result.sha256,
                      "logged_to_run": result.logged_to_run}))


def _generate(args: argparse.Namespace) -> None:
    from ternarylm.deploy.generate import generate_text
    from ternarylm.deploy.inference import load_packed

    packed = load_packed(args.model)
    completion = generate_text(packed, args.prompt, args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed)
    print(args.prompt + completion)


def _export(args: argparse.Namespace) -> None:
    from ternarylm.deploy.export import export_gguf, export_hf

    if args.format == "hf":
        result = export_hf(args.source, args.out)
        print(json.dumps({"path": str(result.path), "format": "hf", "tied": result.tied,
                          "files": result.files, "quantization_note": result.quantization_note}))
        return
    result = export_gguf(args.source, args.out, args.type, args.fallback, args.pad_ffn)
    print(result.note(), file=sys.stderr)  # which tensors fell back, and why
    print(json.dumps({"format": "gguf", **result.to_json()}))


def _eval(args: argparse.Namespace) -> None:
    from ternarylm.evaluation.harness import evaluate

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count; below 1 the harness reads a fraction of each task
    summary = evaluate(args.source, args.tasks, packed=args.packed,
                       include_path=args.include_path, limit=limit,
                       num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       embedding_dtype=args.embedding_dtype, device=args.device,
                       log=not args.no_log, force=args.force)
    print(json.dumps(summary, default=str))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming --help (exit status 2), not a usage
    block; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


def finite_float(text: str) -> float:
    """An argparse type: a number, refusing nan and inf (no option has a meaning for them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _register(args: argparse.Namespace) -> None:
    from ternarylm.orchestration.registry import register_study

    print(json.dumps(register_study(args.study, args.name, args.per, args.experiment)))


def build_parser() -> argparse.ArgumentParser:
    from ternarylm.model.transformer import SIZES
    from ternarylm.model.quantizers import TERNARY_SCHEMES

    parser = OneLineParser(prog="ternarylm", description=__doc__)
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
    p.add_argument("--verbose", action="store_true",
                   help="stream Ray's and DeepSpeed's worker logs to the console")
    p.set_defaults(func=_train)

    p = sub.add_parser("fit", help="fit L(N) = E + A N^-alpha (+ B D^-beta) to a CSV of N, D, loss")
    p.add_argument("csv", help="CSV with columns N, loss and optionally D")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws for the CIs "
                   "(seeds resampled within cells, else parametric; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--joint", action="store_true", help="one precision-aware law across plans: "
                   "L = E + A (N f_plan)^-alpha (+ B D^-beta); CSV columns plan, N, loss or "
                   "val_bpb, packed_bytes (a study's results.csv works)")
    p.add_argument("--reference", default="fp", help="with --joint: the plan with f = 1, the "
                   "most precise one")
    p.add_argument("--budget", type=finite_float, nargs="+", default=[], metavar="BYTES",
                   help="with --joint: predict every plan at these deployable byte budgets, "
                   "with 95%% prediction intervals and P(plan X beats plan Y)")
    p.add_argument("--tokens", type=finite_float, help="with --joint and a D column that varies: the "
                   "training tokens D of the predictions")
    p.set_defaults(func=_fit)

    from ternarylm.orchestration.allocate import SIGNALS

    p = sub.add_parser("allocate", help="a precision plan from a pilot trial: the high format "
                                        "for its most sensitive blocks, within a bit budget")
    p.add_argument("source", help="the pilot: an MLflow run id or a trained-model directory")
    p.add_argument("--budget-bits", type=finite_float, required=True, help="average storage bits per "
                   "weight of the block linears (e.g. 3.5 with int8 over ternary's 2)")
    p.add_argument("--signal", default="loss", choices=SIGNALS, help="loss: validation loss "
                   "rise with one block low; sparsity: 1 - the block's zero-code share (cheaper)")
    p.add_argument("--high", default="int8", help="format of the sensitive blocks")
    p.add_argument("--low", default="ternary", help="format of the other blocks")
    p.add_argument("--max-tokens", type=int, default=20000,
                   help="validation tokens per evaluation of the loss signal")
    p.add_argument("--name", help="plan name (default sensitive_<signal>_<budget>b)")
    p.add_argument("--out", help="write the plan as YAML here (a study lists it as "
                   "{file: PATH})")
    p.set_defaults(func=_allocate)

    from ternarylm.evaluation.glue import POOLINGS, TASKS, GlueSettings

    d = GlueSettings()
    p = sub.add_parser("glue", help="fine-tune a trained model on GLUE MRPC, SST-2 or CoLA and "
                                    "report dev metrics beside the majority-class baseline")
    p.add_argument("--run", required=True, help="pretraining MLflow run id (results are logged "
                   "as its child run) or a local trained-model directory (nothing is logged)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="folder holding MRPC/, SST-2/, CoLA/ GLUE TSVs (default: "
                   "$TERNARYLM_GLUE_DIR, else the hub dataset nyu-mll/glue)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=finite_float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--pooling", default=d.pooling, choices=POOLINGS)
    p.add_argument("--max-train-examples", type=int, help="random subset of the train split")
    p.add_argument("--max-dev-examples", type=int, help="random subset of the dev split")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true",
                   help="fine-tune again even if a finished child run has the same settings")
    p.set_defaults(func=_glue)

    from ternarylm.deploy.packing import EMBEDDING_DTYPES

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
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=finite_float, help="sample among the likeliest tokens whose "
                   "probabilities add up to p (nucleus sampling)")
    p.add_argument("--seed", type=int, help="seed of the sampler, for repeatable output")
    p.set_defaults(func=_generate)

    from ternarylm.deploy.export import FORMATS as EXPORT_FORMATS, GGUF_FALLBACKS, GGUF_TYPES

    p = sub.add_parser("export", help="export a finished trial as a Hugging Face Llama directory "
                                      "or a llama.cpp GGUF file (dequantized / TQ2_0 weights)")
    p.add_argument("source", help="MLflow run id or trained-model directory")
    p.add_argument("out", help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--type", default="tq2_0", choices=GGUF_TYPES,
                   help="gguf: storage of ternary layers whose rows are a multiple of 256 long")
    p.add_argument("--fallback", default="f16", choices=GGUF_FALLBACKS,
                   help="gguf: storage of every other matrix (norms are always f32)")
    p.add_argument("--pad-ffn", action="store_true",
                   help="gguf: zero-pad the MLP hidden size to a multiple of 256 (same outputs) "
                   "so that the down projection is ternary too")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a trained model; a run id's "
                                    "results are logged as its child MLflow run")
    p.add_argument("source", help="MLflow run id, trained-model directory or packed file")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--packed", action="store_true",
                   help="evaluate the packed CPU model (packed on the fly from a run or directory)")
    p.add_argument("--include-path", help="folder of task YAMLs (e.g. on local jsonl files)")
    p.add_argument("--limit", type=finite_float, help="examples per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--embedding-dtype", default="int8", choices=EMBEDDING_DTYPES,
                   help="--packed, packing on the fly (a directory, or a run without a logged "
                   "packed file): storage of floating-point layers, as in `ternarylm pack`")
    p.add_argument("--device", default="cpu", help="latent weights: cpu or cuda[:N]")
    p.add_argument("--no-log", action="store_true", help="do not log a child MLflow run")
    p.add_argument("--force", action="store_true",
                   help="evaluate again even if a finished child run has the same settings")
    p.set_defaults(func=_eval)

    p = sub.add_parser("register", help="register a study's best model per cell (or per "
                                        "frontier point) in the MLflow model registry")
    p.add_argument("study", help="study name (its `name:`)")
    p.add_argument("--name", help="registered model name (default ternarylm-STUDY)")
    p.add_argument("--per", default="cell", choices=["cell", "frontier"],
                   help="cell: the lowest val bits per byte of each size/scheme/plan; "
                   "frontier: every point of the packed-bytes vs bits-per-byte frontier")
    p.add_argument("--experiment", default="ternarylm", help="the study's MLflow experiment")
    p.set_defaults(func=_register)
    return parser


def exit_status(prog: str, verbose: bool, body: Callable[[], int | None]) -> int:
    """Run an entry point's `body`; every error a user can meet is one line on stderr: bad
    input exit status 2, a fault 1 (`verbose` prints its traceback first), Ctrl-C 130. Anything
    else is a bug, and keeps its traceback."""
    try:
        return body() or 0
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Fault as e:
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (--verbose shows the traceback)"
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # outside the steps that stop cleanly on Ctrl-C (Tune's)
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: interrupted; run the same command again to resume",
              file=sys.stderr)
        return Interrupted.exit_status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ternarylm.tracking import quiet_mlflow

    quiet_mlflow()
    verbose = getattr(args, "verbose", False) or os.environ.get("TERNARYLM_VERBOSE") == "1"
    return exit_status(f"ternarylm {args.command}", verbose, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
