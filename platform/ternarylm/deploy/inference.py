"""Inference model of a packed file (`packing`): a fast CPU model, `load_packed`.

`PackedLM`: batch-1 decoding reads every weight once per token, so it runs at the
speed of memory, and the fewer bytes a weight takes the faster it goes. Ternary layers stay at
2 bits in memory and run on our kernel (`kernels.cpu`: 2-bit weights x int8 activations), other
integer layers on its int8 sibling; both are unpacked once at load, never per call. Where the
kernels cannot run, codes are unpacked to int8 for `torch._int_mm`, with identical results.
Measured on a 2-core AVX-512 CPU at batch 1 (benchmarks/inference.py, paper-132m blocks):
the 2-bit kernel ~4x faster than `torch._int_mm` on int8, which beats fp32 sgemv, bf16, fp16
and torch's weight-only `_weight_int8pack_mm` (5x slower than fp32 there). Activations are
quantized per token exactly as in training (`quantize_activations`) and integer sums are exact,
so logits match the fake-quantized model up to float rounding. q/k/v and gate/up are fused into
one matmul each (the layer table's `fused` groups), and decoding uses a KV cache; one token at
batch 1 goes through each block in a single C call (`cpu.DecodeBlock`) when all its
projections run on the kernels.

Activation quantization is discontinuous, so even the fp32 mode matches training only up to
rare code flips: float rounding that differs from training's (integer or fused matmuls
instead of fp32 ones) moves an activation across a rounding boundary now and then, shifting
that sequence's logits by ~1e-4..1e-3. Given identical inputs, every layer's activation codes
are identical to training's and its outputs agree to float rounding (~1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from ternarylm.kernels import cpu
from ternarylm.model.transformer import (
    BLOCKS,
    LayerSpec,
    ModelConfig,
    RMSNorm,
    apply_rope,
    relu_squared,
    rope_tables,
)
from ternarylm.deploy.packing import read_packed, unpack_weight
from ternarylm.model.quantizers import QuantizedWeight, activation_codes, quantize_activations


def quantize_tokens(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes and scales; codes * scale == quantize_activations(x, bits)."""
    codes, scale = activation_codes(x, bits)
    return codes.to(torch.int8), scale


def _per_channel(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor ([] or [1]) or per-row ([n, 1]) scale as one fp32 value per row, [n]."""
    return scale.float().reshape(-1).expand(n).contiguous()


def _quantizes_to_int8(activation_bits: int | None) -> bool:
    return activation_bits is not None and activation_bits <= 8


class Int8Linear(nn.Module):
    """y = x (weight * scale)^T from int8 codes `weight` [N, K] and per-row scales [N]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 activation_bits: int | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", _per_channel(scale, weight.shape[0]))
        self.activation_bits = activation_bits
        self.in_features = weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[0])
        x = x.reshape(-1, x.shape[-1])
        if _quantizes_to_int8(self.activation_bits):
            x_codes, x_scale = quantize_tokens(x, self.activation_bits)
            y = torch._int_mm(x_codes, self.weight.t())  # exact int32 accumulation
            return (y.to(x.dtype) * (x_scale * self.scale)).view(shape)
        # Activations off or wider than int8: weight-only int8 kernel on float activations.
        if self.activation_bits is not None:
            x = quantize_activations(x, self.activation_bits)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight,
                                                  self.scale).view(shape)


class KernelLinear(nn.Module):
    """Int8Linear's result, bit for bit, from `kernels.cpu`: ternary rows at 2 bits, or int8."""

    def __init__(self, rows: torch.Tensor, row_sums: torch.Tensor | None, scale: torch.Tensor,
                 activation_bits: int, in_features: int, fmt: int) -> None:
        super().__init__()
        self.register_buffer("weight", rows.contiguous())  # cpu.pack_rows layout
        self.register_buffer("row_sums", row_sums)
        self.register_buffer("scale", _per_channel(scale, rows.shape[0]))
        self.activation_bits, self.in_features, self.fmt = activation_bits, in_features, fmt

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, activation_bits: int,
                   fmt: int) -> "KernelLinear":
        row_sums = codes.sum(1, dtype=torch.int32) if fmt == cpu.INT8 else None
        return cls(cpu.pack_rows(codes, fmt), row_sums, scale, activation_bits,
                   codes.shape[1], fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[0])
        y = cpu.linear(x.reshape(-1, self.in_features), self.weight, self.row_sums,
                               self.scale, self.in_features, self.fmt, self.activation_bits)
        return y.view(shape)

    def packed_rows(self) -> cpu.PackedRows:
        return cpu.PackedRows(self.weight, self.row_sums, self.scale, self.in_features,
                                      self.fmt, self.activation_bits)


class FloatLinear(nn.Module):
    """A layer kept in floating point (fp32 or fp16), computed in its own dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def _linear(w: QuantizedWeight, activation_bits: int | None, use_kernels: bool) -> nn.Module:
    """The fastest exact module for integer codes: our kernels where this CPU runs them."""
    fmt = cpu.TERNARY if w.bits == 2 else cpu.INT8
    if use_kernels and _quantizes_to_int8(activation_bits) and cpu.supports(fmt):
        return KernelLinear.from_codes(w.codes, w.scale, activation_bits, fmt)
    return Int8Linear(w.codes, w.scale, activation_bits)


class Parallel(nn.Module):
    """Linears reading one input with outputs concatenated, for layers too unlike to fuse."""

    def __init__(self, linears: list[nn.Module]) -> None:
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x) for linear in self.linears], dim=-1)


def _kind(m: nn.Module) -> tuple:
    if isinstance(m, FloatLinear):
        return FloatLinear, m.weight.dtype
    return type(m), m.activation_bits, m.in_features, getattr(m, "fmt", None)


def fuse(linears: list[nn.Module]) -> nn.Module:
    """One matmul for linears that read the same input (q, k, v; gate, up) when they are alike.

    Fusing is exact: weight rows are output channels, independent of each other, and the
    linears share the input's quantization.
    """
    first = linears[0]
    if any(_kind(m) != _kind(first) for m in linears):
        return Parallel(linears)
    weight = torch.cat([m.weight for m in linears])
    if isinstance(first, FloatLinear):
        return FloatLinear(weight)
    scale = torch.cat([m.scale for m in linears])
    if isinstance(first, Int8Linear):
        return Int8Linear(weight, scale, first.activation_bits)
    row_sums = None if first.row_sums is None else torch.cat([m.row_sums for m in linears])
    return KernelLinear(weight, row_sums, scale, first.activation_bits, first.in_features,
                        first.fmt)


class PackedEmbedding(nn.Module):
    """Token embedding from int8 codes and per-row scales, or from a float table."""

    def __init__(self, table: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.table[idx].float()
        return rows if self.scale is None else rows * self.scale[idx]


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per block, each [B, H, seq_len, D]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T queries at positions start.. over the start + T keys."""
    T = q.shape[2]
    if T == 1:  # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, start + T, dtype=torch.bool).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PackedBlock(nn.Module):
    """model.Block for inference: fused projections, optional KV cache, no dropout."""

    def __init__(self, cfg: ModelConfig, specs: list[LayerSpec],
                 layers: dict[str, nn.Module]) -> None:
        """specs: the block's rows of the layer table; layers: packed modules by name."""
        super().__init__()
        self.n_heads = cfg.n_heads
        role = {s.role: layers[s.name] for s in specs}
        fused: dict[str, list[nn.Module]] = {}  # the table's fusion groups, in its order
        for s in specs:
            if s.fused is not None:
                fused.setdefault(s.fused, []).append(layers[s.name])
        self.attn_norm, self.mlp_norm = role["attn_norm"], role["mlp_norm"]
        self.qkv, self.gate_up = fuse(fused["qkv"]), fuse(fused["gate_up"])
        self.o, self.down = role["o"], role["down"]
        self.gated = "gate" in role
        # BitNet blocks (model.BLOCKS): sub-norms before o and down, their gate activation.
        self.activation = BLOCKS[cfg.block].activation
        self.attn_sub_norm = role.get("attn_sub_norm")
        self.mlp_sub_norm = role.get("mlp_sub_norm")
        self.seq_len = cfg.seq_len
        # Decoding one token: the whole block in one C call when every projection runs on
        # our kernels (built on first use, dropped when the tensors move: it holds pointers).
        self.decodes_in_c = (all(isinstance(m, KernelLinear)
                                 for m in (self.qkv, self.o, self.gate_up, self.down))
                             and self.gated and self.activation in (F.silu, relu_squared))
        self._decoder: cpu.DecodeBlock | None = None

    def _apply(self, fn, *args, **kwargs):
        self._decoder = None
        return super()._apply(fn, *args, **kwargs)

    def decoder(self) -> cpu.DecodeBlock:
        if self._decoder is None:
            norms = {name: None if m is None else (m.weight, m.eps) for name, m in (
                ("attn_norm", self.attn_norm), ("mlp_norm", self.mlp_norm),
                ("attn_sub_norm", self.attn_sub_norm), ("mlp_sub_norm", self.mlp_sub_norm))}
            self._decoder = cpu.DecodeBlock(
                self.qkv.packed_rows(), self.o.packed_rows(), self.gate_up.packed_rows(),
                self.down.packed_rows(), norms, self.n_heads, self.activation is relu_squared,
                self.seq_len)
        return self._decoder

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        B, T, C = x.shape
        if self.decodes_in_c and kv is not None and B == T == 1 and x.dtype == torch.float32:
            return self.decoder()(x, kv[0], kv[1], start, cos, sin)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(x)).split(C, dim=-1))  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv[0][:, :, start:start + T], kv[1][:, :, start:start + T] = k, v
            k, v = kv[0][:, :, :start + T], kv[1][:, :, :start + T]
        y = _attend(q, k, v, start).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y if self.attn_sub_norm is None else self.attn_sub_norm(y))
        gate_up = self.gate_up(self.mlp_norm(x))
        if self.gated:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(gate_up)
        return x + self.down(h if self.mlp_sub_norm is None else self.mlp_sub_norm(h))


class PackedLM(nn.Module):
    """TernaryLM's forward from packed layers (keyed by TernaryLM's module names)."""

    def __init__(self, cfg: ModelConfig, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed, self.norm, self.head = layers["embed"], layers["norm"], layers["head"]
        table = cfg.layer_table()
        self.blocks = nn.ModuleList(PackedBlock(cfg, [s for s in table if s.block == i], layers)
                                    for i in range(cfg.n_layers))
        cos, sin = rope_tables(cfg.seq_len, cfg.width // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def new_cache(self, batch: int = 1) -> KVCache:
        shape = (batch, self.cfg.n_heads, self.cfg.seq_len, self.cfg.width // self.cfg.n_heads)
        n = self.cfg.n_layers
        return KVCache([torch.zeros(shape) for _ in range(n)], [torch.zeros(shape) for _ in range(n)])

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, V]; with a cache, idx continues the cached tokens."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's context of "
                             f"{self.cfg.seq_len}")
        x = self.embed(idx)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        for i, block in enumerate(self.blocks):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = block(x, cos, sin, kv, start)
        if cache is not None:
            cache.length += T
        return self.head(self.norm(x))


def _module(name: str, entry: dict, tensors: dict[str, torch.Tensor],
            use_kernels: bool) -> nn.Module:
    w = unpack_weight(name, entry, tensors)
    if entry["kind"] == "norm":
        norm = RMSNorm(entry["shape"][0])
        norm.load_state_dict({"weight": w})
        return norm
    if entry["kind"] == "embedding":
        return (PackedEmbedding(w.codes, w.scale) if isinstance(w, QuantizedWeight)
                else PackedEmbedding(w, None))
    if isinstance(w, QuantizedWeight):
        return _linear(w, entry["activation_bits"], use_kernels)
    return FloatLinear(w)


@dataclass
class PackedModel:
    model: PackedLM
    tokenizer: Tokenizer
    eos_id: int
    config: dict[str, Any]


def load_packed(path: str | Path, use_kernels: bool = True) -> PackedModel:
    """The inference model of a packed file (checksum verified), with its tokenizer.

    use_kernels=False runs integer layers on torch's int8 matmul instead of `kernels.cpu`:
    same results, slower, and ternary layers take 4x the memory.
    """
    config, tensors = read_packed(path)
    layers = {name: _module(name, entry, tensors, use_kernels)
              for name, entry in config["layers"].items()}
    del tensors  # the packed bytes are no longer needed once unpacked
    model = PackedLM(ModelConfig(**config["model"]), layers)
    return PackedModel(model, Tokenizer.from_str(config["tokenizer"]), config["eos_id"], config)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage a loaded model holds (parameters and buffers)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
