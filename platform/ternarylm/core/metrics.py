"""Every metric ternarylm records, declared once: its name, unit and meaning.

Workers, drivers, GLUE, results and plots use the names defined here and nowhere else spell
them. A metric marked `summary` is also written as `final/<name>` when its trial finishes (the
value at the last step), and one with a `column` is a column of the study's results table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Metric:
    name: str
    """MLflow metric key."""
    unit: str
    """Unit of the value (nats/token, bytes, s, fraction, ...)."""
    meaning: str
    """One line: what the number is and how it is measured."""
    summary: bool = False
    """Also logged as `final/<name>` when the trial finishes."""
    column: str | None = None
    """Column name in the study's results table, if it is one."""


METRICS: dict[str, Metric] = {}
SUMMARY_PREFIX = "final/"


def _declare(name: str, unit: str, meaning: str, *, summary: bool = False,
             column: str | None = None) -> str:
    METRICS[name] = Metric(name, unit, meaning, summary, column)
    return name


# Training progress, logged every `log_every` steps.
TRAIN_LOSS = _declare("train/loss", "nats/token", "training loss of the step, averaged over "
                      "ranks (label smoothing included)")
TRAIN_LR = _declare("train/lr", "1", "learning rate of the step")
TOKENS_PER_S = _declare("perf/tokens_per_s", "tokens/s", "training throughput of the whole "
                        "trial since the last report", summary=True, column="tokens_per_s")
FLOPS_PER_S = _declare("perf/flops_per_s", "FLOP/s", "model FLOPs per second (6N + attention "
                       "per token, ModelConfig.flops_per_token)")
MFU = _declare("perf/mfu", "fraction", "model FLOPs utilisation against the GPU's dense bf16 "
               "peak (known GPUs only)", summary=True)
TOKENS = _declare("progress/tokens", "tokens", "training tokens seen so far", summary=True)
FLOPS = _declare("progress/flops", "FLOP", "training FLOPs so far (the dry run's figure for the "
                 "whole budget)", summary=True, column="flops")
PEAK_RSS = _declare("memory/peak_rss_bytes", "bytes", "peak resident memory of the rank-0 "
                    "worker process", summary=True, column="peak_rss_bytes")
PEAK_CUDA = _declare("memory/peak_cuda_bytes", "bytes", "peak CUDA memory allocated by rank 0",
                     summary=True)

# Evaluation, every `eval_every` steps and at the end.
VAL_LOSS = _declare("val/loss", "nats/token", "mean next-token loss on the validation split "
                    "(no label smoothing)", summary=True, column="val_loss")
VAL_PPL = _declare("val/ppl", "1", "validation perplexity exp(val/loss); depends on the "
                   "tokenizer", summary=True, column="val_ppl")
VAL_LOSS_SMOOTHED = _declare("val/loss_smoothed", "nats/token", "validation loss with the "
                             "training loss's label smoothing (exp of it: the TernaryLM paper's "
                             "perplexity)", summary=True, column="val_loss_smoothed")
VAL_BPB = _declare("val/bpb", "bits/byte", "validation bits per UTF-8 byte; comparable across "
                   "tokenizers", summary=True, column="val_bpb")
TRAIN_SAMPLE_LOSS = _declare("train_sample/loss", "nats/token", "loss on a fixed sample of the "
                             "training split, in eval mode")
TRAIN_SAMPLE_PPL = _declare("train_sample/ppl", "1", "perplexity on that training sample",
                            summary=True)
TRAIN_VAL_RATIO = _declare("train_val_ratio", "1", "validation perplexity over training-sample "
                           "perplexity (1 = no overfitting)", summary=True,
                           column="train_val_ratio")
SPARSITY = _declare("sparsity/ternary", "fraction", "zero codes over all ternary weights",
                    summary=True, column="sparsity")
EFFECTIVE_BITS = _declare("bits/effective_ternary", "bits", "entropy of the ternary codes per "
                          "weight (what an ideal entropy coder would need)")
LEARNED_DRIFT = _declare("scale/learned_drift", "1", "mean learned scale over its initial "
                         "value (learned scheme)", summary=True)
LATENT_BYTES = _declare("memory/latent_fp32_bytes", "bytes", "the model's parameters at fp32, "
                        "as trained", summary=True, column="latent_fp32_bytes")

# At the end of the trial: the deployable artifact, measured.
PACKED_BYTES = _declare("memory/packed_bytes", "bytes", "size on disk of the file `ternarylm "
                        "pack` writes for the final model (default options)", summary=True,
                        column="packed_bytes")
PACKED_RESIDENT = _declare("memory/packed_resident_bytes", "bytes", "bytes held by the packed "
                           "model once loaded for inference (weights as the kernels keep them)",
                           summary=True, column="packed_resident_bytes")

# Time, per launch of a trial.
WORKER_INIT_S = _declare("time/worker_init_s", "s", "worker start to first training step "
                         "(imports, data, engine, checkpoint restore)", summary=True)
WORKER_START_S = _declare("time/worker_start_s", "s", "Ray Train's launch of the worker group: "
                          "fit() called to the worker's entry (actors, placement, process "
                          "group)", summary=True)
WORKER_EXPORT_S = _declare("time/worker_export_s", "s", "worker after the loop: the final "
                           "model and packed file written, measured and logged", summary=True)
TRAIN_LOOP_S = _declare("time/train_loop_s", "s", "wall time of the training loop (evaluations "
                        "included)", summary=True, column="train_loop_s")
EVAL_S = _declare("time/eval_s", "s", "the evaluations inside the training loop (part of "
                  "time/train_loop_s)", summary=True)
SETUP_S = _declare("time/setup_s", "s", "driver: checks, data, Ray and MLflow before training")
FIT_S = _declare("time/fit_s", "s", "driver: Ray Train's fit(), worker group start to end")
FINISH_S = _declare("time/finish_s", "s", "driver: plots and run closing after training")
LOGGED_MODEL_S = _declare("time/logged_model_s", "s", "driver: the packed file downloaded and "
                          "logged as the trial's MLflow model (part of finish_s)")
TRIAL_WALL_S = _declare("time/trial_wall_s", "s", "the study's view of one trial: Tune "
                        "starting it to Tune seeing it end", summary=True, column="trial_wall_s")
OUTSIDE_TRAINING_S = _declare("time/outside_training_s", "s", "everything of this launch but "
                              "the training loop (in a study: the trial's wall time as Tune saw "
                              "it, less the loop)", summary=True, column="outside_loop_s")

# A study's parent run.
STUDY_TRIALS = _declare("study/trials", "trials", "trials in the study's grid")
STUDY_FINISHED = _declare("study/trials_finished", "trials", "trials that finished")
STUDY_FAILED = _declare("study/trials_failed", "trials", "trials that failed")
STUDY_STOPPED = _declare("study/trials_stopped_early", "trials", "trials stopped early by ASHA")

# GLUE fine-tuning child runs.
GLUE_TRAIN_LOSS = TRAIN_LOSS
GLUE_DEV_PREFIX, GLUE_BASELINE_PREFIX, GLUE_DELTA_PREFIX = "dev/", "baseline/", "delta/"

# lm-eval harness child runs: eval/<task>/<metric>[_<filter>] as the harness names them.
EVAL_PREFIX = "eval/"
EVAL_SECONDS = _declare("eval/seconds", "s", "wall time of one lm-eval harness run")

_BLOCK_SPARSITY = "sparsity/block_{:02d}"
_BLOCK_RE = re.compile(r"^sparsity/block_(\d+)$")
METRICS[_BLOCK_SPARSITY] = Metric(_BLOCK_SPARSITY, "fraction", "zero codes over the ternary "
                                  "weights of one block (one metric per block)")


def block_sparsity(block: int) -> str:
    """Metric name of one block's zero fraction."""
    return _BLOCK_SPARSITY.format(block)


def block_values(metrics: Mapping[str, float]) -> dict[int, float]:
    """Per-block zero fractions found among `metrics`, by block index."""
    out = {}
    for name, value in metrics.items():
        if m := _BLOCK_RE.match(name):
            out[int(m.group(1))] = value
    return dict(sorted(out.items()))


def final(name: str) -> str:
    """The summary key of a metric: `final/<name>`."""
    return SUMMARY_PREFIX + name


def summary_names() -> list[str]:
    return [m.name for m in METRICS.values() if m.summary]


def summary_of(latest: Mapping[str, float]) -> dict[str, float]:
    """`final/...` metrics from a run's latest values: every summary metric it has, and the
    per-block sparsities."""
    names = set(summary_names()) | {k for k in latest if _BLOCK_RE.match(k)}
    return {final(k): float(v) for k, v in latest.items() if k in names}


def finals(metrics: Mapping[str, float]) -> dict[str, float]:
    """The `final/...` entries of a run's metrics, keyed by the metric's own name."""
    return {k[len(SUMMARY_PREFIX):]: v for k, v in metrics.items()
            if k.startswith(SUMMARY_PREFIX)}


def table_columns() -> dict[str, str]:
    """Results-table column -> metric name, in declaration order."""
    return {m.column: m.name for m in METRICS.values() if m.column}


def glue_dev(name: str) -> str:
    return GLUE_DEV_PREFIX + name


def glue_baseline(name: str) -> str:
    return GLUE_BASELINE_PREFIX + name


def glue_delta(name: str) -> str:
    """Dev metric minus the majority baseline's."""
    return GLUE_DELTA_PREFIX + name


def lm_eval(task: str, name: str) -> str:
    """One lm-eval harness result: its task and metric (with its filter), spaces as `_`."""
    return f"{EVAL_PREFIX}{task}/{name}".replace(" ", "_")


def study_best(metric: str, size: str, plan: str) -> str:
    """Parent-run metric: the best value of `metric` among a study's trials of one cell."""
    return f"best/{metric}/{size}/{plan}"


def study_fit(group: str, constant: str) -> str:
    """Parent-run metric: a fitted scaling-law constant of one (scheme/plan) group."""
    return f"fit/{group}/{constant}"
