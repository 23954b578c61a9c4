"""GLUE fine-tuning of a pretrained trial's model, locally or logged to MLflow.

The trained model is loaded with its precision plan (its QuantLinear modules stay, so fine-tuning
is quantization-aware exactly like pretraining); dev metrics are always reported beside the
train-majority baseline (on MRPC dev it already scores F1 0.812, so an F1 alone says little).

`finetune_and_log` records a fine-tuning as an MLflow run nested under the pretraining run (same
experiment, tag mlflow.parentRunId); `run_glue` also accepts a local trained-model directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ternarylm.core import metrics as M
from ternarylm.core.identity import content_key
from ternarylm.evaluation.glue.data import (
    HUB_DATASET,
    N_CLASSES,
    GlueData,
    GlueError,
    GlueTask,
    encode,
    glue_metrics,
    load_glue,
    majority_label,
    pad_batch,
    resolve_data_dir,
    task_spec,
)
from ternarylm.evaluation.glue.model import POOLINGS, GlueClassifier
from ternarylm.training.optim import linear_warmup_decay, param_groups
from ternarylm.model.plans import ConvertedLayer, convert
from ternarylm.model.quantizers import FP

GLUE_TASK_TAG = "ternarylm.glue.task"
GLUE_KEY_TAG = "ternarylm.glue.key"
GLUE_SOURCE_TAG = "ternarylm.glue.source_run"


@dataclass
class GlueSettings:
    epochs: int = 3
    """Passes over the (possibly capped) training split."""
    lr: float = 1e-4
    """Peak AdamW learning rate, for the LM and the new classifier alike."""
    batch_size: int = 32
    """Examples per optimizer step."""
    pooling: str = "mean"
    """`mean` over real tokens or the `last` real token of the final hidden states."""
    max_train_examples: int | None = None
    """Cap on training examples (a seeded random subset); None uses the whole split."""
    max_dev_examples: int | None = None
    """Cap on dev examples (a seeded random subset; the baseline uses the same); None = all."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not norms, biases or quantizer scales)."""
    warmup_fraction: float = 0.1
    """Share of steps with linear warmup; the rest decays linearly to zero."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    classifier_dropout: float = 0.1
    """Dropout on the pooled representation before the classifier."""
    eval_batch_size: int = 64
    """Examples per evaluation batch."""
    seed: int = 0
    """Seed of the head's initialisation, subsets, shuffling and dropout."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GlueError(f"glue.{name} must be a positive integer, got {value!r}")
        for name in ("max_train_examples", "max_dev_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise GlueError(f"glue.{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise GlueError(f"glue.lr must be positive, got {self.lr!r}")
        if self.pooling not in POOLINGS:
            raise GlueError(f"glue.pooling must be one of {', '.join(POOLINGS)}, got "
                            f"{self.pooling!r}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise GlueError("glue.weight_decay must be >= 0 and glue.grad_clip positive")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.classifier_dropout < 1:
            raise GlueError("glue.warmup_fraction and glue.classifier_dropout must be in [0, 1)")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise GlueError(f"glue.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GlueSettings:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GlueError(f"unknown glue setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
        return cls(**d)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class GlueResult:
    task: str
    metrics: dict[str, float]
    """Dev metrics of the fine-tuned model."""
    baseline: dict[str, float]
    """The same metrics of always predicting the train split's majority label."""
    majority_label: int
    n_train: int
    n_dev: int
    steps: int
    train_loss: list[tuple[int, float]]
    """(step, loss) of every optimizer step."""
    seconds: float
    quant_linears: int
    """QuantLinear modules in the LM after fine-tuning."""
    formats_kept: bool
    """Every layer still has the format the precision plan gave it."""
    predictions: list[int] = field(repr=False)
    model: GlueClassifier | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "baseline": self.baseline,
                "majority_label": self.majority_label, "n_train": self.n_train,
                "n_dev": self.n_dev, "steps": self.steps,
                "final_train_loss": self.train_loss[-1][1] if self.train_loss else None,
                "seconds": round(self.seconds, 3), "quant_linears": self.quant_linears,
                "formats_kept": self.formats_kept}


def _seeded_subset(data: GlueData, cap: int | None, seed: int) -> GlueData:
    if cap is None or cap >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(data), generator=g)[:cap].tolist())
    return data.subset(keep)


def layer_formats(layers: dict[str, ConvertedLayer]) -> dict[str, str]:
    """name -> format of every quantized weight of a model's `plans.convert`."""
    return {name: layer.format for name, layer in layers.items() if layer.quantized is not None}


@torch.no_grad()
def predict(model: GlueClassifier, seqs: list[list[int]], pad_id: int, batch_size: int,
            device: torch.device) -> list[int]:
    """Argmax class of every sequence (batched by length; the order of `seqs` is kept)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    preds = [0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in chunk], pad_id, device)
        for i, p in zip(chunk, model(ids, mask).argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    return preds


def finetune(trained, task: str | GlueTask, settings: GlueSettings, train: GlueData,
             dev: GlueData, on_step: Callable[[int, float], None] | None = None) -> GlueResult:
    """Fine-tune `trained.model` (a TrainedModel from artifacts.load_trained; its LM is trained
    in place) on `train` and score `dev`, beside the train-majority baseline on the same dev."""
    spec = task_spec(task)
    t0 = time.perf_counter()
    majority = majority_label(train.labels)  # from ALL train labels, before any cap
    train = _seeded_subset(train, settings.max_train_examples, settings.seed)
    dev = _seeded_subset(dev, settings.max_dev_examples, settings.seed + 1)
    if not len(train) or not len(dev):
        raise GlueError(f"{spec.name}: empty train ({len(train)}) or dev ({len(dev)}) split")
    lm, eos = trained.model, trained.eos_id
    planned = {n: f for n, f in trained.formats.items() if f != FP}
    seq_len = lm.cfg.seq_len
    train_ids = encode(trained.tokenizer, train, eos, seq_len)
    dev_ids = encode(trained.tokenizer, dev, eos, seq_len)
    device = settings.torch_device()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = GlueClassifier(lm, N_CLASSES, settings.pooling, settings.classifier_dropout)
        model.to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr,
                                      betas=(0.9, 0.98), eps=1e-6)
        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        total = steps_per_epoch * settings.epochs
        warmup = int(settings.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: linear_warmup_decay(step, warmup, total))
        labels = torch.tensor(train.labels, dtype=torch.long)
        g = torch.Generator().manual_seed(settings.seed)
        history: list[tuple[int, float]] = []
        step = 0
        for _ in range(settings.epochs):
            perm = torch.randperm(len(train), generator=g).tolist()
            for start in range(0, len(perm), settings.batch_size):
                chunk = perm[start:start + settings.batch_size]
                ids, mask = pad_batch([train_ids[i] for i in chunk], eos, device)
                loss = F.cross_entropy(model(ids, mask), labels[chunk].to(device))
                if not torch.isfinite(loss):
                    raise GlueError(f"{spec.name} fine-tuning diverged: loss {loss.item()} at "
                                    f"step {step}; lower glue.lr (now {settings.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                history.append((step, loss.item()))
                if on_step is not None:
                    on_step(*history[-1])
                step += 1
        preds = predict(model, dev_ids, eos, settings.eval_batch_size, device)
    model.eval()
    metrics = glue_metrics(spec, dev.labels, preds)
    baseline = glue_metrics(spec, dev.labels, [majority] * len(dev))
    layers = convert(model.lm)
    return GlueResult(spec.name, metrics, baseline, majority, len(train), len(dev), step,
                      history, time.perf_counter() - t0, quant_linears=_count_quant(layers),
                      formats_kept=layer_formats(layers) == planned,
                      predictions=preds, model=model)


def _count_quant(layers: dict[str, ConvertedLayer]) -> int:
    return sum(layer.spec.kind == "linear" and layer.quantized is not None
               for layer in layers.values())


# ---------------------------------------------------------------------------------------------
# Entry points: MLflow-logged (run id) or local (trained-model directory)


def _data_label(data_dir: Path | None) -> str:
    return str(data_dir.resolve()) if data_dir is not None else f"hub:{HUB_DATASET}"


def glue_key(source_run_id: str, task: str, settings: GlueSettings, data: str) -> str:
    """Content hash of one fine-tuning: the same key means the same result."""
    return content_key("glue", {"source": source_run_id, "task": task,
                                "settings": settings.to_dict(), "data": data})


def _load_splits(spec: GlueTask, data_dir: Path | None) -> tuple[GlueData, GlueData]:
    return load_glue(spec, "train", data_dir), load_glue(spec, "dev", data_dir)


def finetune_and_log(source_run_id: str, task: str, settings: GlueSettings | None = None,
                     data_dir: str | Path | None = None, *, force: bool = False) -> dict[str, Any]:
    """Fine-tune the model of pretraining run `source_run_id` on `task` and log it as a child
    run (mlflow.parentRunId = source_run_id, same experiment): params `glue.*`, per-step
    `train/loss`, `dev/<metric>`, `baseline/<metric>` (train-majority class) and
    `delta/<metric>` (dev minus baseline), plus results.json. A finished child with the same
    settings is reused unless `force`. Returns the results as a JSON-ready dict."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from ternarylm import tracking
    from ternarylm.deploy.artifacts import load_trained

    settings = settings or GlueSettings()
    spec = task_spec(task)
    uri = tracking.tracking_uri()
    c = tracking.client(uri)
    try:
        parent = c.get_run(source_run_id)
    except MlflowException as err:
        also = (" and it is not a trained-model directory either"
                if os.sep in source_run_id or source_run_id.startswith(".") else "")
        raise GlueError(f"pretraining run {source_run_id!r} not found in MLflow store {uri}{also} "
                        f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
                        ) from None
    experiment_id = parent.info.experiment_id
    data_dir = resolve_data_dir(data_dir)
    key = glue_key(source_run_id, spec.name, settings, _data_label(data_dir))
    if not force:
        done = tracking.finished_run(uri, experiment_id, GLUE_KEY_TAG, key, source_run_id)
        if done is not None:
            return _stored_result(done, spec, source_run_id)
    train, dev = _load_splits(spec, data_dir)  # bad data fails before any run is created
    trained = load_trained(source_run_id)
    run_name = f"{parent.info.run_name or source_run_id[:8]}-glue-{spec.name}"
    tags = {GLUE_TASK_TAG: spec.name, GLUE_KEY_TAG: key, GLUE_SOURCE_TAG: source_run_id}
    with tracking.child_run(uri, experiment_id, run_name, tags, source_run_id,
                            f"glue {spec.name}") as run_id:
        params = {"glue.task": spec.name, "glue.source_run": source_run_id,
                  "glue.data": _data_label(data_dir), "glue.train_source": train.source,
                  "glue.dev_source": dev.source, "size": trained.trial.size,
                  "scheme": trained.trial.scheme, "plan": trained.trial.plan.name,
                  **{f"glue.{k}": ("none" if v is None else v)
                     for k, v in settings.to_dict().items()}}
        tracking.log_params(uri, run_id, params)
        result = finetune(trained, spec, settings, train, dev)
        now = int(time.time() * 1000)
        metrics = [Metric(M.GLUE_TRAIN_LOSS, loss, now, step)
                   for step, loss in result.train_loss]
        summary = {**{M.glue_dev(k): v for k, v in result.metrics.items()},
                   **{M.glue_baseline(k): v for k, v in result.baseline.items()},
                   **{M.glue_delta(k): result.metrics[k] - result.baseline[k]
                      for k in result.metrics},
                   "n_train": result.n_train, "n_dev": result.n_dev, "steps": result.steps,
                   "majority_label": result.majority_label, "quant_linears": result.quant_linears,
                   "seconds": result.seconds}
        metrics += [Metric(k, float(v), now, result.steps) for k, v in summary.items()]
        tracking.log_metrics(uri, run_id, metrics)
        out = {**result.to_json(), "run_id": run_id, "source": source_run_id,
               "size": trained.trial.size, "scheme": trained.trial.scheme,
               "plan": trained.trial.plan.name, "skipped": False}
        tracking.set_tags(uri, run_id, {"ternarylm.glue.formats_kept": result.formats_kept})
        with tempfile.TemporaryDirectory() as d:
            Path(d, "results.json").write_text(json.dumps(out, indent=1))
            tracking.log_artifact(uri, run_id, Path(d, "results.json"), "glue")
        return out


def _stored_result(run, spec: GlueTask, source_run_id: str) -> dict[str, Any]:
    m, p = run.data.metrics, run.data.params
    return {"task": spec.name,
            "metrics": {k: m[M.glue_dev(k)] for k in spec.metrics if M.glue_dev(k) in m},
            "baseline": {k: m[M.glue_baseline(k)] for k in spec.metrics
                         if M.glue_baseline(k) in m},
            "majority_label": int(m.get("majority_label", -1)),
            "n_train": int(m.get("n_train", 0)), "n_dev": int(m.get("n_dev", 0)),
            "steps": int(m.get("steps", 0)),
            "final_train_loss": m.get(M.GLUE_TRAIN_LOSS), "seconds": m.get("seconds"),
            "quant_linears": int(m.get("quant_linears", 0)),
            "formats_kept": run.data.tags.get("ternarylm.glue.formats_kept") == "True",
            "run_id": run.info.run_id, "source": source_run_id, "size": p.get("size"),
            "scheme": p.get("scheme"), "plan": p.get("plan"), "skipped": True}


def run_glue(source: str, task: str, settings: GlueSettings | None = None,
             data_dir: str | Path | None = None, *, force: bool = False) -> dict[str, Any]:
    """`ternarylm glue`: a trained-model directory is fine-tuned without MLflow (run_id None);
    anything else is taken as a pretraining run id and goes through finetune_and_log."""
    settings = settings or GlueSettings()
    from ternarylm.deploy.artifacts import load_trained, run_id_of

    if run_id_of(source) is not None:
        return finetune_and_log(source, task, settings, data_dir, force=force)

    spec = task_spec(task)
    data = resolve_data_dir(data_dir)
    train, dev = _load_splits(spec, data)
    trained = load_trained(source)
    result = finetune(trained, spec, settings, train, dev)
    return {**result.to_json(), "run_id": None, "source": str(source),
            "size": trained.trial.size, "scheme": trained.trial.scheme,
            "plan": trained.trial.plan.name, "skipped": False}
