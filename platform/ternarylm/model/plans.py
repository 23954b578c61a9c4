"""Precision plans: which weight format every linear layer gets, chosen by qualified name.

A plan is applied (torchao's "prepare") by `apply_plan`, which swaps the `nn.Linear` and
`nn.Embedding` modules of a built model's layer table, so the model code never knows about
precision; `convert` turns the trained model into per-layer quantized weights (format, codes,
scales per qualified name) for deployment and analysis. Resolution order,
later rules overriding earlier ones, for each linear inside a transformer block
(`blocks.<i>.attn.*` / `blocks.<i>.mlp.*`):

    default -> attention / mlp -> first_k / last_k -> blocks -> overrides (glob on the name)

The format "ternary" stands for the trial's ternary scheme, so one plan serves every scheme of a
study. The output head is set by `head` and the token embedding by `embedding`. A plan can also
live in a YAML file of these fields (`{file: plan.yaml}` in a study), as `ternarylm allocate`
writes one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ternarylm.core.errors import UserError, yaml_problem
from ternarylm.model.transformer import LayerSpec, TernaryLM
from ternarylm.model.quantizers import (
    FORMATS,
    FP,
    TERNARY_SCHEMES,
    WEIGHT_FORMATS,
    QuantEmbedding,
    QuantizedWeight,
    QuantLinear,
)

TERNARY = "ternary"
PLAN_FORMATS = (TERNARY, *FORMATS)
EMBEDDING_FORMATS = (FP, "int8", "int4")


class PlanError(UserError):
    """A precision plan that cannot be applied; the message says what to change."""


def _check_format(value: str, where: str, allowed: tuple[str, ...] = PLAN_FORMATS) -> None:
    if value not in allowed:
        raise PlanError(f"precision plan: unknown format {value!r} for {where}; "
                        f"choose one of {', '.join(allowed)}")


@dataclass
class PrecisionPlan:
    name: str = "custom"
    """Name recorded with results (a preset's name, or your own)."""
    default: str = TERNARY
    """Format of every block linear that no other rule selects."""
    attention: str | None = None
    """Format of attention projections (q, k, v, o), if different from the default."""
    mlp: str | None = None
    """Format of MLP projections (gate, up, down), if different from the default."""
    first_k: int | float = 0
    """First blocks given `boundary_format`: a count, or a fraction of depth if below 1."""
    last_k: int | float = 0
    """Last blocks given `boundary_format`: a count, or a fraction of depth if below 1."""
    boundary_format: str = "int8"
    """Format of the first_k and last_k blocks."""
    blocks: dict[int, str] = field(default_factory=dict)
    """Explicit format per block index (0-based)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Glob on qualified linear names -> format, applied last; each must select something."""
    embedding: str = FP
    """Token embedding precision: fp, int8 or int4 (per-row absmax)."""
    head: str = FP
    """Output head format (any weight format)."""
    activation_bits: int | None = 8
    """Per-token absmax bits for inputs of quantized linears; None turns it off."""

    def __post_init__(self) -> None:
        _check_format(self.default, "default")
        for rule in ("attention", "mlp"):
            if getattr(self, rule) is not None:
                _check_format(getattr(self, rule), rule)
        _check_format(self.boundary_format, "boundary_format")
        _check_format(self.head, "head")
        _check_format(self.embedding, "embedding", EMBEDDING_FORMATS)
        for rule in ("first_k", "last_k"):
            k = getattr(self, rule)
            if (isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0
                    or (k >= 1 and k != int(k))):
                raise PlanError(f"precision plan: {rule} must be a block count >= 0 or a "
                                f"fraction of depth in (0, 1), got {k!r}")
        # New dicts: `preset()` copies a preset with dataclasses.replace, which would otherwise
        # share (and let callers mutate) the preset's own dicts.
        try:
            self.blocks = {int(i): f for i, f in self.blocks.items()}
        except (AttributeError, TypeError, ValueError):
            raise PlanError(f"precision plan: blocks must map block indices (integers) to "
                            f"formats, got {self.blocks!r}") from None
        self.overrides = dict(self.overrides)
        for i, fmt in self.blocks.items():
            if i < 0:
                raise PlanError(f"precision plan: block index {i} is negative; blocks are "
                                f"numbered from 0")
            _check_format(fmt, f"block {i}")
        for pattern, fmt in self.overrides.items():
            _check_format(fmt, f"override {pattern!r}")
        if self.activation_bits is not None and not 2 <= self.activation_bits <= 16:
            raise PlanError(f"precision plan: activation_bits must be between 2 and 16 or null "
                            f"(off), got {self.activation_bits}")

    def _count(self, k: int | float, n_layers: int) -> int:
        return round(k * n_layers) if 0 < k < 1 else int(k)

    def resolve(self, layers: list[LayerSpec], n_layers: int, scheme: str) -> dict[str, str]:
        """Concrete format of every linear of a layer table (`ModelConfig.layer_table`) for a
        model of `n_layers` blocks."""
        if scheme not in TERNARY_SCHEMES:
            raise PlanError(f"unknown ternary scheme {scheme!r}; choose one of "
                            f"{', '.join(TERNARY_SCHEMES)}")
        first, last = self._count(self.first_k, n_layers), self._count(self.last_k, n_layers)
        if first + last > n_layers:
            raise PlanError(f"precision plan {self.name!r}: first_k={first} + last_k={last} "
                            f"exceed the model's {n_layers} blocks")
        for i in self.blocks:
            if i >= n_layers:
                raise PlanError(f"precision plan {self.name!r}: block index {i} is out of range "
                                f"for a model with {n_layers} blocks (0..{n_layers - 1})")
        linears = [s for s in layers if s.kind == "linear"]
        linear_names = [s.name for s in linears]
        formats = {s.name: self._block_format(s, n_layers, first, last) for s in linears}
        for pattern, fmt in self.overrides.items():
            selected = fnmatch.filter(linear_names, pattern)
            if not selected:
                raise PlanError(f"precision plan {self.name!r}: override {pattern!r} selects no "
                                f"layer; names look like {linear_names[0]!r}")
            formats.update(dict.fromkeys(selected, fmt))
        return {n: scheme if f == TERNARY else f for n, f in formats.items()}

    def _block_format(self, layer: LayerSpec, n_layers: int, first: int, last: int) -> str:
        if layer.block is None:
            return self.head
        fmt = (self.attention if layer.sublayer == "attn" else self.mlp) or self.default
        if layer.block < first or layer.block >= n_layers - last:
            fmt = self.boundary_format
        return self.blocks.get(layer.block, fmt)

    def to_flat(self) -> dict[str, Any]:
        """Flat string/number dict, e.g. for MLflow params."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = ";".join(f"{k}={v}" for k, v in value.items())
            flat[f"plan.{f.name}"] = "none" if value is None else value
        return flat

    @classmethod
    def from_config(cls, value: str | dict[str, Any] | "PrecisionPlan") -> "PrecisionPlan":
        """A preset name, a dict of fields (optionally with `preset:` to start from), a plan
        file (`{file: path.yaml}` or a string ending in .yaml/.yml, e.g. written by
        `ternarylm allocate`; relative paths are relative to the working directory), or a plan."""
        if isinstance(value, PrecisionPlan):
            return value
        if isinstance(value, str):
            return load_plan_file(value) if value.endswith(_PLAN_FILE_SUFFIXES) else preset(value)
        if not isinstance(value, dict):
            raise PlanError(f"precision plan must be a preset name or a mapping, got {value!r}")
        if "file" in value:
            if len(value) != 1:
                raise PlanError(f"precision plan: `file` must stand alone (put other fields in "
                                f"the file), got fields {', '.join(sorted(value))}")
            return load_plan_file(value["file"])
        fields = dict(value)
        base = preset(fields.pop("preset")) if "preset" in fields else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise PlanError(f"precision plan: unknown field(s) {', '.join(unknown)}; "
                            f"known fields: {', '.join(sorted(known))}")
        return dataclasses.replace(base, **fields)


_PLAN_FILE_SUFFIXES = (".yaml", ".yml")


def load_plan_file(path: str | Path) -> PrecisionPlan:
    """A plan from a YAML file holding one mapping of plan fields (`preset:` allowed)."""
    path = Path(path).expanduser()
    try:
        fields = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PlanError(f"precision plan file {path}: cannot read it ({e.strerror}); check the "
                        f"path (relative paths are taken from the working directory)") from None
    except yaml.YAMLError as e:
        raise PlanError(f"precision plan file {path} is not valid YAML "
                        f"({yaml_problem(e)})") from None
    if not isinstance(fields, dict) or "file" in fields:
        raise PlanError(f"precision plan file {path} must hold one mapping of plan fields "
                        f"(no nested `file:`)")
    try:
        return PrecisionPlan.from_config(fields)
    except PlanError as e:
        raise PlanError(f"precision plan file {path}: {e}") from None


PRESETS: dict[str, PrecisionPlan] = {
    p.name: p for p in (
        PrecisionPlan(name="fp", default=FP, activation_bits=None),
        PrecisionPlan(name="int8", default="int8"),
        PrecisionPlan(name="int4", default="int4"),
        PrecisionPlan(name="all_ternary"),
        # The embedding and head dominate the bytes of small models: the same ternary blocks with
        # both vocabulary matrices trained at int8 or int4 (all_ternary trains them in floating
        # point; `ternarylm pack` then stores them at its --embedding-dtype).
        PrecisionPlan(name="all_ternary_int8_vocab", embedding="int8", head="int8"),
        PrecisionPlan(name="all_ternary_int4_vocab", embedding="int4", head="int4"),
        PrecisionPlan(name="boundary_int8", first_k=2, last_k=2, boundary_format="int8"),
        # The paper's finding: middle blocks tolerate ternary best; int4 on the outer thirds.
        PrecisionPlan(name="middle_ternary", first_k=1 / 3, last_k=1 / 3, boundary_format="int4"),
    )
}


def preset(name: str) -> PrecisionPlan:
    if name not in PRESETS:
        raise PlanError(f"unknown precision plan {name!r}; presets: {', '.join(PRESETS)} "
                        f"(or give a mapping of plan fields)")
    return dataclasses.replace(PRESETS[name])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_plan(model: TernaryLM, plan: PrecisionPlan, scheme: str,
               n_layers: int) -> dict[str, str]:
    """Prepare (for training): swap the linears and embedding of the model's layer table for
    quantized ones; returns name -> format."""
    table = model.cfg.layer_table()
    formats = plan.resolve(table, n_layers, scheme)
    for name, fmt in formats.items():
        if fmt == FP:
            continue
        _set_submodule(model, name, QuantLinear.from_linear(
            model.get_submodule(name), WEIGHT_FORMATS[fmt](), plan.activation_bits))
    if plan.embedding != FP:
        for layer in table:
            if layer.kind == "embedding":
                _set_submodule(model, layer.name, QuantEmbedding.from_embedding(
                    model.get_submodule(layer.name), WEIGHT_FORMATS[plan.embedding]()))
                formats[layer.name] = plan.embedding
    return formats


@dataclass
class ConvertedLayer:
    """One weight of a prepared, trained model as deployment takes it (`convert`)."""

    spec: LayerSpec
    format: str
    """Weight format (absmean, int8, ...), or fp for norms and layers training kept in float."""
    weight: torch.Tensor
    """The trained weight (the latent one of a quantized layer), detached."""
    quantized: QuantizedWeight | None
    """Codes and scale exactly as the forward pass uses them; None for a float layer."""
    activation_bits: int | None
    """Per-token bits of a quantized linear's input; None for float input and other layers."""
    initial_scale: torch.Tensor | None = None
    """The scale a learned quantizer started from; None for the other formats."""

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight the forward pass uses: codes x scale, or a copy of the float one."""
        if self.quantized is None:
            return self.weight.float().clone()
        return self.quantized.codes.float() * self.quantized.scale.float()


@torch.no_grad()
def convert(model: TernaryLM) -> dict[str, ConvertedLayer]:
    """Convert (for deployment): every weight of a prepared (`apply_plan`) model, in layer-table
    order, as its format, codes and scales; packing, export, analysis, allocation and GLUE read
    this instead of the modules. A meta-device model gives meta tensors (to size a file)."""
    return {spec.name: _converted(spec, model.get_submodule(spec.name))
            for spec in model.cfg.layer_table()}


def _converted(spec: LayerSpec, module: nn.Module) -> ConvertedLayer:
    weight = module.weight.detach()
    if not isinstance(module, (QuantLinear, QuantEmbedding)):
        return ConvertedLayer(spec, FP, weight, None, None)
    quantizer = module.weight_quantizer
    return ConvertedLayer(spec, module.format, weight, quantizer.quantize(module.weight),
                          getattr(module, "activation_bits", None),
                          getattr(quantizer, "initial_scale", None))
