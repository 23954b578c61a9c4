"""Sensitivity-guided precision plans: give the higher precision to the blocks that need it.

From a finished pilot trial, every transformer block gets a score, higher meaning more sensitive:

  loss      the rise of validation loss (nats/token) when that block alone is in the low format
            and every other block in the high one, over the loss with every block high. Formats
            are swapped on the trained weights (no retraining); a block already trained in a
            format keeps its own quantizer (a learned scale stays learned).
  sparsity  1 - the block's share of zero ternary codes, the paper's cheaper signal (middle
            blocks, which tolerate ternary best, have the most zeros); needs no data, but the
            pilot's blocks must be ternary.

Budget: the parameter-weighted average storage bits of the block linears' weight codes (ternary
2, int4 4, int8 8, fp 16; scales, embedding and head not counted). Blocks are taken by
decreasing score and given the high format while the average stays within the budget, so the
plan's average is the largest reachable one <= the budget; every block of a TernaryLM has the
same size, so that is exactly the budget whenever the budget is reachable, i.e.
low + k (high - low) / n_blocks for a whole number k of blocks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ternarylm.model.stats import block_sparsity, layer_stats
from ternarylm.deploy.artifacts import TrainedModel, load_trained
from ternarylm.data import eval_batches, prepare_data
from ternarylm.core.errors import UserError
from ternarylm.model.transformer import TernaryLM
from ternarylm.model.plans import PLAN_FORMATS, TERNARY, PrecisionPlan
from ternarylm.model.quantizers import (
    FP,
    WEIGHT_FORMATS,
    QuantLinear,
    WeightQuantizer,
    format_bits,
)

SIGNALS = ("loss", "sparsity")


class AllocateError(UserError):
    """An allocation that cannot be made; the message says what to change."""


@dataclass
class Allocation:
    plan: PrecisionPlan
    """The plan: every block explicit in `blocks`, the pilot's embedding, head, activations."""
    signal: str
    """`loss` or `sparsity`."""
    scores: dict[int, float]
    """Sensitivity per block (higher: more sensitive)."""
    block_params: dict[int, int]
    """Weights of each block's linears."""
    average_bits: float
    """Parameter-weighted average storage bits of the block linears under the plan."""
    budget_bits: float
    """The budget asked for."""
    base_loss: float | None = None
    """Validation loss with every block in the high format (loss signal only)."""

    def to_json(self) -> dict[str, Any]:
        return {"plan": plan_fields(self.plan), "signal": self.signal,
                "scores": self.scores, "block_params": self.block_params,
                "average_bits": self.average_bits, "budget_bits": self.budget_bits,
                "base_loss": self.base_loss}


def plan_fields(plan: PrecisionPlan) -> dict[str, Any]:
    """The fields of a plan that differ from a default PrecisionPlan (name always kept)."""
    default = PrecisionPlan()
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
            if f.name == "name" or getattr(plan, f.name) != getattr(default, f.name)}


def _bits(fmt: str, scheme: str) -> int:
    return format_bits(scheme if fmt == TERNARY else fmt)


def choose_blocks(scores: dict[int, float], block_params: dict[int, int], budget_bits: float,
                  high_bits: float, low_bits: float) -> list[int]:
    """Blocks given the high format: by decreasing score (ties: lower index first), each taken
    while the parameter-weighted average bits stay <= budget_bits."""
    if not high_bits > low_bits:
        raise AllocateError(f"the high format ({high_bits:g} bits) must have more bits than the "
                            f"low one ({low_bits:g}); swap --high and --low")
    if not low_bits <= budget_bits <= high_bits:
        raise AllocateError(f"--budget-bits {budget_bits:g} is outside [{low_bits:g}, "
                            f"{high_bits:g}], the averages the low and high formats can reach")
    total = sum(block_params.values())
    # Bits to spend above the all-low plan; the tolerance keeps float rounding from turning a
    # reachable budget (e.g. 3.3 with 10 blocks) into an unreachable one.
    room = (budget_bits - low_bits) * total * (1 + 1e-12)
    chosen = []
    for block in sorted(scores, key=lambda b: (-scores[b], b)):
        extra = (high_bits - low_bits) * block_params[block]
        if extra <= room:
            chosen.append(block)
            room -= extra
    return sorted(chosen)


def block_linears(model: TernaryLM) -> dict[int, list[QuantLinear]]:
    """Quantized linears of each transformer block (the layer table's block linears); refuses
    blocks left in floating point."""
    out: dict[int, list[QuantLinear]] = {}
    for spec in model.cfg.layer_table():
        if spec.kind != "linear" or spec.block is None:
            continue
        m = model.get_submodule(spec.name)
        if not isinstance(m, QuantLinear):
            raise AllocateError(f"the pilot keeps {spec.name} in floating point; train the "
                                f"pilot with a quantized plan (e.g. all_ternary)")
        out.setdefault(spec.block, []).append(m)
    return out


def _quantizer(layer: QuantLinear, fmt: str, trained: WeightQuantizer) -> WeightQuantizer:
    """The layer's trained quantizer when it already has this format, else a new one."""
    if trained.name == fmt:
        return trained
    q = WEIGHT_FORMATS[fmt]()
    q.init_from(layer.weight)
    return q


@torch.no_grad()
def _mean_loss(model: nn.Module, tokens, seq_len: int, batch_size: int, max_tokens: int) -> float:
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, batch_size, max_tokens=max_tokens):
        total += float(model.loss(x, y)) * y.numel()
        count += y.numel()
    return total / count


def loss_scores(trained: TrainedModel, high: str, low: str, max_tokens: int,
                batch_size: int = 16) -> tuple[float, dict[int, float]]:
    """Loss with every block high, and each block's loss rise when it alone is low."""
    trial, model = trained.trial, trained.model
    high, low = (trial.scheme if f == TERNARY else f for f in (high, low))
    blocks = block_linears(model)
    trained_q = {id(m): m.weight_quantizer for layers in blocks.values() for m in layers}
    tokens = prepare_data(trial.data).tokens("validation")

    def loss_with(low_block: int | None) -> float:
        for b, layers in blocks.items():
            for m in layers:
                fmt = low if b == low_block else high
                m.weight_quantizer = _quantizer(m, fmt, trained_q[id(m)])
        return _mean_loss(model, tokens, trial.seq_len, batch_size, max_tokens)

    try:
        base = loss_with(None)
        rises = {b: loss_with(b) - base for b in blocks}
    finally:  # leave the model as it was loaded
        for layers in blocks.values():
            for m in layers:
                m.weight_quantizer = trained_q[id(m)]
    return base, rises


def sparsity_scores(trained: TrainedModel) -> dict[int, float]:
    """1 - each block's zero-code share; every block must be ternary in the pilot."""
    blocks = block_linears(trained.model)
    sparsity = block_sparsity(layer_stats(trained.model))
    missing = sorted(set(blocks) - set(sparsity))
    if missing:
        raise AllocateError(f"--signal sparsity needs ternary blocks, but the pilot's blocks "
                            f"{missing} are not ternary; use --signal loss or an all_ternary "
                            f"pilot")
    return {b: 1.0 - sparsity[b] for b in blocks}


def allocate(source: str | Path, budget_bits: float, signal: str = "loss", high: str = "int8",
             low: str = TERNARY, max_tokens: int = 20000, name: str | None = None) -> Allocation:
    """A plan for the pilot's architecture meeting `budget_bits` (see the module docstring).

    `source` is an MLflow run id or a trained-model directory; `max_tokens` caps the validation
    tokens of each of the n_blocks + 1 evaluations of the loss signal.
    """
    if signal not in SIGNALS:
        raise AllocateError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")
    for fmt in (high, low):
        if fmt not in PLAN_FORMATS:
            raise AllocateError(f"unknown format {fmt!r}; choose one of "
                                f"{', '.join(PLAN_FORMATS)}")
    if signal == "loss" and FP in (high, low):
        raise AllocateError("the loss signal swaps weight quantizers and fp has none; choose "
                            "quantized formats for --high and --low, or --signal sparsity")
    if max_tokens < 1:
        raise AllocateError(f"max_tokens must be positive, got {max_tokens}")
    trained = load_trained(source)
    scheme = trained.trial.scheme
    high_bits, low_bits = _bits(high, scheme), _bits(low, scheme)
    blocks = block_linears(trained.model)
    params = {b: sum(m.weight.numel() for m in layers) for b, layers in blocks.items()}
    # Checked before the evaluations, which are the slow part.
    choose_blocks(dict.fromkeys(params, 0.0), params, budget_bits, high_bits, low_bits)
    base = None
    if signal == "loss":
        base, scores = loss_scores(trained, high, low, max_tokens)
    else:
        scores = sparsity_scores(trained)
    chosen = choose_blocks(scores, params, budget_bits, high_bits, low_bits)
    plan = dataclasses.replace(
        trained.trial.plan, name=name or f"sensitive_{signal}_{budget_bits:g}b", default=low,
        attention=None, mlp=None, first_k=0, last_k=0, overrides={},
        blocks={b: high if b in chosen else low for b in blocks})
    total = sum(params.values())
    average = sum(params[b] * (high_bits if b in chosen else low_bits) for b in params) / total
    return Allocation(plan, signal, scores, params, average, budget_bits, base)


def check_out_path(path: str | Path) -> Path:
    """The plan's path, its folder made; refused before any measuring if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AllocateError(f"cannot write the plan to {path} ({e.strerror}); pick a writable "
                            f"path") from None
    if not os.access(path.parent, os.W_OK) or path.is_dir():
        raise AllocateError(f"cannot write the plan to {path}; pick a writable file path")
    return path


def write_plan(allocation: Allocation, path: str | Path) -> Path:
    """The plan as YAML (a study lists it as `{file: PATH}`), its evidence as comments."""
    a = allocation
    lines = [f"# ternarylm allocate: signal {a.signal}, average {a.average_bits:g} bits per "
             f"block weight (budget {a.budget_bits:g})"]
    if a.base_loss is not None:
        lines.append(f"# validation loss with every block high: {a.base_loss:.4f}")
    lines += [f"# block {b}: score {s:.5g}" for b, s in a.scores.items()]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(plan_fields(a.plan), sort_keys=False)
    path = check_out_path(path)
    try:
        path.write_text(text)
    except OSError as e:
        raise AllocateError(f"cannot write the plan to {path} ({e.strerror}); pick a writable "
                            f"path in an existing folder") from None
    return path
