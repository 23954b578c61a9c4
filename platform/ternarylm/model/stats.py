"""Per-layer analysis of a quantized model, and its size and cost without training it."""

from __future__ import annotations

from typing import Any

import torch

from ternarylm.model.transformer import ModelConfig, TernaryLM
from ternarylm.model.plans import PrecisionPlan, convert
from ternarylm.model.quantizers import TERNARY_SCHEMES


def _entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy of the code distribution: the bits an ideal entropy coder would need."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / codes.numel()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def layer_stats(model: TernaryLM) -> list[dict[str, Any]]:
    """One row per quantized layer (of `convert`): sparsity (zero codes), scale statistics,
    effective bits."""
    rows = []
    for name, layer in convert(model).items():
        q = layer.quantized
        if q is None:
            continue
        row = {
            "layer": name,
            "block": layer.spec.block,
            "format": layer.format,
            "numel": layer.weight.numel(),
            "zero_fraction": float((q.codes == 0).float().mean()),
            "scale_mean": float(q.scale.float().mean()),
            "scale_std": float(q.scale.float().std()) if q.scale.numel() > 1 else 0.0,
            "storage_bits": q.bits,
            "effective_bits": _entropy_bits(q.codes),
        }
        if layer.initial_scale is not None:
            row["scale_initial"] = float(layer.initial_scale.float().mean())
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
    formats = plan.resolve(cfg.layer_table(), cfg.n_layers, TERNARY_SCHEMES[0])
    return any(f in TERNARY_SCHEMES for f in formats.values())
