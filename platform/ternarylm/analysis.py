"""Per-layer analysis of a quantized model, and its size and cost without training it."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ternarylm.model import ModelConfig
from ternarylm.plans import PrecisionPlan
from ternarylm.quantizers import TERNARY_SCHEMES, QuantEmbedding, QuantLinear

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy of the code distribution: the bits an ideal entropy coder would need."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / codes.numel()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer: sparsity (zero codes), scale statistics, effective bits."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (QuantLinear, QuantEmbedding)):
            continue
        q = m.weight_quantizer.quantize(m.weight)
        block = _BLOCK.match(name)
        row = {
            "layer": name,
            "block": int(block.group(1)) if block else None,
            "format": m.format,
            "numel": m.weight.numel(),
            "zero_fraction": float((q.codes == 0).float().mean()),
            "scale_mean": float(q.scale.float().mean()),
            "scale_std": float(q.scale.float().std()) if q.scale.numel() > 1 else 0.0,
            "storage_bits": q.bits,
            "effective_bits": _entropy_bits(q.codes),
        }
        if hasattr(m.weight_quantizer, "initial_scale"):
            row["scale_initial"] = float(m.weight_quantizer.initial_scale.float().mean())
        rows.append(row)
    return rows


def block_sparsity(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Fraction of zero codes per block over its ternary layers, weighted by size."""
    zeros: dict[int, float] = {}
    total: dict[int, int] = {}
    for r in rows:
        if r["block"] is None or r["format"] not in TERNARY_SCHEMES:
            continue
        zeros[r["block"]] = zeros.get(r["block"], 0.0) + r["zero_fraction"] * r["numel"]
        total[r["block"]] = total.get(r["block"], 0) + r["numel"]
    return {b: zeros[b] / total[b] for b in sorted(total)}


def has_ternary_layers(cfg: ModelConfig, plan: PrecisionPlan) -> bool:
    """Whether a plan puts any linear of this model in a ternary scheme (fp does not)."""
    formats = plan.resolve(cfg.linear_names(), cfg.n_layers, TERNARY_SCHEMES[0])
    return any(f in TERNARY_SCHEMES for f in formats.values())
