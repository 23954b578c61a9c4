"""Per-layer analysis of a quantized model, and its size and cost without training it."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn as nn

from ternarylm.model import ModelConfig, TernaryLM, model_config
from ternarylm.plans import PrecisionPlan, apply_plan
from ternarylm.quantizers import FP, TERNARY_SCHEMES, QuantEmbedding, QuantLinear, format_bits

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
            row["scale_initial"] = float(m.weight_quantizer.initial_scale)
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


def packed_bytes(model: nn.Module, formats: dict[str, str]) -> int:
    """Bytes of the deployable model: each weight at its format's width plus fp32 scales.

    Unquantized tensors (norms, fp layers and embeddings) count at fp16.
    """
    total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        module_name = name.rpartition(".")[0]
        fmt = formats.get(module_name, FP) if name.endswith("weight") else FP
        if module_name.endswith("weight_quantizer"):
            continue  # a learned scale: counted with the scales below
        total += math.ceil(p.numel() * format_bits(fmt) / 8)
        if fmt != FP:
            per_channel = fmt.startswith("int") or fmt == "absmean_channel"
            total += 4 * (p.shape[0] if per_channel else 1)
    return total


def describe(cfg: ModelConfig, plan: PrecisionPlan, scheme: str) -> dict[str, Any]:
    """Parameter counts, FLOPs and memory of a model under a plan, built on the meta device."""
    with torch.device("meta"):
        model = TernaryLM(cfg)
        formats = apply_plan(model, plan, scheme, cfg.n_layers)
    counts = cfg.param_counts()
    ternary = sum(model.get_submodule(n).weight.numel() for n, f in formats.items()
                  if f in TERNARY_SCHEMES)
    packed = packed_bytes(model, formats)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    return {
        **counts,
        "ternary_weights": ternary,
        "flops_per_token": cfg.flops_per_token(),
        "fp32_bytes": fp32,
        "packed_bytes": packed,
        "compression": fp32 / packed,
        "formats": dict(sorted({f: sum(1 for v in formats.values() if v == f)
                                for f in set(formats.values())}.items())),
    }


def has_ternary_layers(size: str, plan: PrecisionPlan) -> bool:
    """Whether a plan puts any layer of this size in a ternary scheme (fp does not)."""
    return describe(model_config(size, vocab_size=256), plan, TERNARY_SCHEMES[0])["ternary_weights"] > 0
