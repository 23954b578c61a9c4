"""Trial configuration: one model, trained once. Loaded from YAML, validated before Ray starts.

Validation is cheap (no model is built): every field's type is checked against its annotation
in one place (`_build`), then each dataclass checks its values in `__post_init__`. Fields marked
`RUN_ONLY` say how and where a trial runs, not what it trains, and stay out of its key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ternarylm.data import DataConfig
from ternarylm.core.errors import UserError, yaml_problem
from ternarylm.core.identity import content_key
from ternarylm.model.transformer import ModelConfig, model_config
from ternarylm.model.plans import PrecisionPlan
from ternarylm.model.quantizers import TERNARY_SCHEMES


class ConfigError(UserError):
    """A configuration that cannot run; the message names the field and what to do."""


def ternarylm_home() -> Path:
    """Where local runs keep their MLflow store and Ray Train results ($TERNARYLM_HOME)."""
    return Path(os.environ.get("TERNARYLM_HOME", Path.home() / ".ternarylm")).expanduser()


RUN_ONLY = {"identity": False}
"""Field metadata: how or where the trial runs (cadences, caps, resources, names, places), not
what model it trains; such fields are left out of `TrialConfig.key()`."""


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                or not math.isfinite(value)):
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
    """`cosine` (warmup then cosine decay), `wsd` (warmup, stable, decay) or `two_stage`
    (BitNet b1.58's: the cosine with a drop at `stage2_at`; see ternarylm.training.optim)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """With `wsd`: fraction of steps spent in the final linear decay."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not norms, scales or biases), as in the paper."""
    stage2_at: float = 0.5
    """With `two_stage`: fraction of steps after which the learning rate drops (BitNet b1.58
    2B4T: "approximately midway")."""
    stage2_lr_ratio: float = 2 / 3
    """With `two_stage`: the stage-2 learning rate as a fraction of the stage-1 curve (BitNet's
    training tips: 1.5e-3 -> 1e-3 and 1.2e-3 -> 8e-4)."""
    stage2_weight_decay: float = 0.0
    """With `two_stage`: weight decay in stage 2 (BitNet b1.58 and TriLM: 0)."""
    weight_decay_stage2_at: float | None = None
    """With `two_stage`: fraction of steps after which `stage2_weight_decay` applies; None =
    `stage2_at` (BitNet); TriLM (Spectra) removes weight decay at 2/3."""
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
    eval_every: int = field(default=50, metadata=RUN_ONLY)
    """Steps between evaluations (and one at the end)."""
    eval_max_tokens: int | None = field(default=None, metadata=RUN_ONLY)
    """Cap on validation tokens per evaluation; None walks the whole split."""
    train_sample_tokens: int = field(default=16384, metadata=RUN_ONLY)
    """Training tokens evaluated in eval mode for the train/val ratio."""
    checkpoint_every: int = field(default=50, metadata=RUN_ONLY)
    """Steps between checkpoints."""
    log_every: int = field(default=10, metadata=RUN_ONLY)
    """Steps between metric reports."""
    inject_nan_at_step: int | None = field(default=None, metadata=RUN_ONLY)
    """Fault injection: make the training loss NaN at this step (tests divergence handling)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _positive(self, "steps", "micro_batch", "grad_accum", "lr", "eval_every",
                  "checkpoint_every", "log_every", "train_sample_tokens", "grad_clip")
        if self.schedule not in ("cosine", "wsd", "two_stage"):
            raise ConfigError(f"train.schedule must be 'cosine', 'wsd' or 'two_stage', got "
                              f"{self.schedule!r}")
        for name in ("stage2_at", "weight_decay_stage2_at"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"train.{name} must be a fraction of steps in (0, 1), got "
                                  f"{value!r}")
        if not 0 < self.stage2_lr_ratio <= 1:
            raise ConfigError(f"train.stage2_lr_ratio must be in (0, 1], got "
                              f"{self.stage2_lr_ratio!r}")
        if self.weight_decay < 0 or self.stage2_weight_decay < 0:
            raise ConfigError("train.weight_decay and train.stage2_weight_decay must be >= 0")
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
        if self.schedule == "two_stage" and int(self.stage2_at * self.steps) < self.warmup_steps:
            raise ConfigError(f"train.stage2_at ({self.stage2_at}) starts stage 2 at step "
                              f"{int(self.stage2_at * self.steps)}, inside the "
                              f"{self.warmup_steps} warmup steps; raise stage2_at or lower "
                              f"warmup_steps")


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
    block: str = "llama"
    """Block variant: `llama` (the paper's) or `bitnet` (BitNet b1.58's sub-norms and squared
    ReLU; see ternarylm.model.transformer.BLOCKS)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and evaluation settings."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: int = field(default=1, metadata=RUN_ONLY)
    """CPUs reserved per worker."""
    use_gpu: bool = False
    """One GPU per worker."""
    max_failures: int = field(default=2, metadata=RUN_ONLY)
    """Worker failures a trial survives (restarts from its last checkpoint)."""
    experiment: str = field(default="ternarylm", metadata=RUN_ONLY)
    """MLflow experiment name."""
    recipe: str | None = field(default=None, metadata=RUN_ONLY)
    """The named recipe (ternarylm.model.recipes) a study built this trial from: a label, since the
    recipe's settings are the trial's own fields."""
    name: str | None = field(default=None, metadata=RUN_ONLY)
    """Run name; defaults to `<size>-<scheme>-<plan>-s<seed>-<key>`."""
    storage_path: str | None = field(default=None, metadata=RUN_ONLY)
    """Ray Train storage (local path or s3://, gs://); default $TERNARYLM_STORAGE_PATH or
    $TERNARYLM_HOME/runs."""

    def __post_init__(self) -> None:
        if self.scheme not in TERNARY_SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; choose one of "
                              f"{', '.join(TERNARY_SCHEMES)}")
        self.plan = PrecisionPlan.from_config(self.plan)
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "trial.data")
        if isinstance(self.train, dict):
            self.train = _build(TrainConfig, self.train, "trial.train")
        _positive(self, "num_workers", "cpus_per_worker")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        if not self.experiment.strip():
            raise ConfigError("experiment is empty: name the MLflow experiment (default "
                              "ternarylm)")
        # Size, seq_len and the plan checked against the model's shape, without building it.
        self.plan.resolve(self.shape.layer_table(), self.shape.n_layers, self.scheme)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return model_config(self.size, vocab_size=vocab_size, seq_len=self.seq_len,
                            dropout=self.dropout, tie_head=self.tie_head, block=self.block)

    @property
    def shape(self) -> ModelConfig:
        """The model where the vocabulary does not matter (its blocks, layer names, plans):
        a placeholder vocabulary, since the real one is known only once data is tokenized."""
        return self.model_config(vocab_size=256)

    @property
    def run_name(self) -> str:
        cell = self.recipe or f"{self.scheme}-{self.plan.name}"
        return self.name or f"{self.size}-{cell}-s{self.seed}-{self.key()[:8]}"

    def check_capacity(self, resources: dict[str, float]) -> None:
        """Refuse a trial the cluster can never place (no autoscaler can add nodes)."""
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = self.num_workers
        lower = {"CPU": "lower num_workers or cpus_per_worker",
                 "GPU": "set use_gpu: false, lower num_workers, join a cluster with GPUs"}
        for kind, amount in need.items():
            if amount > resources.get(kind, 0):
                raise ConfigError(
                    f"trial {self.run_name} needs {amount:g} {kind} ({self.num_workers} workers) "
                    f"but the Ray cluster has {resources.get(kind, 0):g}; {lower[kind]}, or set "
                    f"TERNARYLM_AUTOSCALING=1 on a cluster that scales up")

    @property
    def global_batch_tokens(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.num_workers * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plan"] = dataclasses.asdict(self.plan)
        return d

    def identity(self) -> dict[str, Any]:
        """The settings that define the trained model: every field not marked RUN_ONLY (size,
        scheme, plan, data, tokenizer, optimiser, schedule, budget, seed, batch), less the
        plan's name and the token cache's place."""
        d = _identity_fields(self)
        d["data"].pop("cache_dir")
        d["plan"].pop("name")
        return d

    def key(self) -> str:
        """Content key of `identity()` (every field, defaults included) and the trial numerics
        version (`ternarylm.core.identity`): two configs with one key train the same model."""
        return content_key("trial", self.identity())

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


def _identity_fields(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict of its identity fields, nested dataclasses likewise."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("identity", True):
            value = getattr(obj, f.name)
            out[f.name] = (_identity_fields(value) if dataclasses.is_dataclass(value)
                           else value)
    return out


YAML_HINT = ("indent with spaces, not tabs, and write plain values (tags such as "
             "!!python/object are not read)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({yaml_problem(e)}); "
                          f"{YAML_HINT}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got "
                          f"{type(d).__name__}")
    return d


def _build(cls: type, d: dict[str, Any], where: str):
    """Construct dataclass `cls` from a mapping, refusing unknown keys and values whose type
    does not match the field's annotation, by dotted name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    values = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "list": "a list", "dict": "a mapping",
                "tuple": "a list"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """`value` if it fits `annotation` (an int where a float belongs becomes a float), else a
    ConfigError naming the field `where`. Dataclass fields accept their mappings (built by the
    dataclass itself); a precision plan accepts a preset name or a mapping."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(value, float) and not math.isfinite(value):
        # YAML reads .nan and .inf as numbers; no setting has a meaning for them (a rate, a
        # clip or a fraction of NaN would train garbage, or crash minutes in).
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return check_type(value, arg, where)
        raise ConfigError(f"{where} must be "
                          f"{' or '.join(_type_name(a) for a in args).replace('NoneType', 'null')}"
                          f", got {value!r}")
    if annotation is PrecisionPlan:
        if isinstance(value, (str, dict, PrecisionPlan)):
            return value
        raise ConfigError(f"{where} must be a preset name or a mapping of settings, got "
                          f"{value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, (dict, annotation)):
            return value
        raise ConfigError(f"{where} must be a mapping of settings, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
            return tuple(check_type(v, a, f"{where}[{i}]") for i, (v, a) in
                         enumerate(zip(value, args)))
        item = args[0] if args else Any
        checked = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {check_type(k, key_type, f"{where} key"): check_type(v, value_type,
                                                                      f"{where}.{k}")
                for k, v in value.items()}
    return _check_scalar(value, annotation, where)


def _check_scalar(value: Any, annotation: type, where: str) -> Any:
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    if annotation not in (int, float, bool, str):
        return value  # a type this checker does not know: the dataclass checks it
    hint = ""
    if annotation is float and isinstance(value, str):
        hint = " (YAML reads 3e-3 as text: write 3.0e-3)"
    raise ConfigError(f"{where} must be {_type_name(annotation)}, got {value!r}{hint}")
