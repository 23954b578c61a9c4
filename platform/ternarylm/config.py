"""Trial configuration: one model, trained once. Loaded from YAML, validated before Ray starts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ternarylm.analysis import describe
from ternarylm.data import DataConfig
from ternarylm.errors import UserError
from ternarylm.model import ModelConfig, model_config
from ternarylm.plans import PrecisionPlan
from ternarylm.quantizers import TERNARY_SCHEMES


class ConfigError(UserError):
    """A configuration that cannot run; the message names the field and what to do."""


def ternarylm_home() -> Path:
    """Where local runs keep their MLflow store and Ray Train results ($TERNARYLM_HOME)."""
    return Path(os.environ.get("TERNARYLM_HOME", Path.home() / ".ternarylm")).expanduser()


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive number, got "
                              f"{value!r}")


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    micro_batch: int = 8
    """Sequences per worker per micro step."""
    grad_accum: int = 1
    """Micro steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    schedule: str = "cosine"
    """`cosine` (warmup then cosine decay) or `wsd` (warmup, stable, decay)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """With `wsd`: fraction of steps spent in the final linear decay."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not norms, scales or biases), as in the paper."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas, as in the paper."""
    grad_clip: float = 1.0
    """Global gradient norm clip."""
    label_smoothing: float = 0.0
    """Label smoothing of the training loss only; evaluation never smooths."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0-3)."""
    precision: str = "auto"
    """`auto` (bf16 on CUDA, fp32 on CPU), `bf16` or `fp32`."""
    eval_every: int = 50
    """Steps between evaluations (and one at the end)."""
    eval_max_tokens: int | None = None
    """Cap on validation tokens per evaluation; None walks the whole split."""
    train_sample_tokens: int = 16384
    """Training tokens evaluated in eval mode for the train/val ratio."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    log_every: int = 10
    """Steps between metric reports."""
    inject_nan_at_step: int | None = None
    """Fault injection: make the training loss NaN at this step (tests divergence handling)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _positive(self, "steps", "micro_batch", "grad_accum", "lr", "eval_every",
                  "checkpoint_every", "log_every", "train_sample_tokens", "grad_clip")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"train.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got "
                              f"{self.precision!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got "
                              f"{self.label_smoothing}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("train.min_lr_ratio must be in [0, 1] and train.decay_fraction "
                              "in (0, 1]")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) must be >= 0 and below "
                              f"train.steps ({self.steps})")


@dataclass
class TrialConfig:
    size: str = "tiny"
    """Model size preset (see `ternarylm describe`)."""
    scheme: str = "absmean"
    """Ternary scaling-factor scheme used wherever the plan says `ternary`."""
    plan: PrecisionPlan = field(default_factory=lambda: PrecisionPlan.from_config("all_ternary"))
    """Precision plan: a preset name or a mapping of plan fields."""
    seed: int = 0
    """Seed of initialisation and data order."""
    seq_len: int = 256
    """Training context length."""
    dropout: float = 0.0
    """Dropout rate."""
    tie_head: bool = False
    """Tie the output head to the embedding."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and evaluation settings."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    use_gpu: bool = False
    """One GPU per worker."""
    max_failures: int = 2
    """Worker failures a trial survives (restarts from its last checkpoint)."""
    experiment: str = "ternarylm"
    """MLflow experiment name."""
    name: str | None = None
    """Run name; defaults to `<size>-<scheme>-<plan>-s<seed>-<key>`."""
    storage_path: str | None = None
    """Ray Train storage (local path or s3://, gs://); default $TERNARYLM_STORAGE_PATH or
    $TERNARYLM_HOME/runs."""

    def __post_init__(self) -> None:
        if self.scheme not in TERNARY_SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; choose one of "
                              f"{', '.join(TERNARY_SCHEMES)}")
        self.plan = PrecisionPlan.from_config(self.plan)
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data")
        if isinstance(self.train, dict):
            self.train = _build(TrainConfig, self.train, "train")
        _positive(self, "num_workers", "cpus_per_worker")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        # Builds the model on the meta device: checks size, seq_len and the plan against it now.
        describe(self.model_config(vocab_size=256), self.plan, self.scheme)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return model_config(self.size, vocab_size=vocab_size, seq_len=self.seq_len,
                            dropout=self.dropout, tie_head=self.tie_head)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.size}-{self.scheme}-{self.plan.name}-s{self.seed}-{self.key()[:8]}"

    def check_capacity(self, resources: dict[str, float]) -> None:
        """Refuse a trial the cluster can never place (no autoscaler can add nodes)."""
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = self.num_workers
        for kind, amount in need.items():
            if amount > resources.get(kind, 0):
                raise ConfigError(
                    f"trial {self.run_name} needs {amount:g} {kind} ({self.num_workers} workers) "
                    f"but the Ray cluster has {resources.get(kind, 0):g}; lower num_workers or "
                    f"cpus_per_worker, or set TERNARYLM_AUTOSCALING=1 on a cluster that scales up")

    @property
    def global_batch_tokens(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.num_workers * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plan"] = dataclasses.asdict(self.plan)
        return d

    def key(self) -> str:
        """Content hash of the settings that change the trained model (not names or places).

        Only settings that differ from their defaults are hashed, so a release that adds a
        setting (with a default that keeps the old behaviour) leaves every key as it was.
        """
        d = _changed(self.to_dict(), _default_trial_dict())
        for k in ("experiment", "name", "storage_path", "max_failures"):
            d.pop(k, None)
        d.get("data", {}).pop("cache_dir", None)
        d.get("plan", {}).pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Flattened `section.field` params for MLflow."""
        flat: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        flat.update(self.plan.to_flat())
        return {k: ("none" if v is None else v) for k, v in flat.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        return _build(cls, d, "trial")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        return cls.from_dict(load_yaml(path))


@functools.cache
def _default_trial_dict() -> dict[str, Any]:
    return TrialConfig().to_dict()


def _changed(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of `value` that differ from `default`, nested mappings compared key by key."""
    out = {}
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            if sub := _changed(v, default[k]):
                out[k] = sub
        elif k not in default or v != default[k]:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got "
                          f"{type(d).__name__}")
    return d


def _build(cls: type, d: dict[str, Any], where: str):
    """Construct dataclass `cls` from a mapping, refusing unknown keys by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
