"""Packed ternary models: one small file for deployment, and a fast CPU inference model for it.

`pack` turns a finished trial (MLflow run id or trained-model directory) into one safetensors
file: every quantized layer as its integer codes packed at the layer's width plus the scales of
training, bit for bit; the embedding and head, where training kept them in floating point, in
`embedding_dtype`; block linears a plan kept in floating point at fp16 (the model whose
quality was measured, not a quantized one); the norms in fp32. The metadata hold a JSON config
(model, plan, layer table, tokenizer) and a SHA-256 over config and tensors, so that a
truncated or modified file is refused instead of loaded.

Code packing: a byte holds `per_byte` digits d_i in [0, base) as sum(d_i * base^i), with
d = code + (base - 1) // 2. Ternary (and int2) codes take 2 bits (4 per byte) or, with
`trits`, 5 per byte (3^5 = 243 <= 256: 1.6 bits); int4 codes take 4 bits, int8 codes 8.

Inference (`PackedLM`): batch-1 decoding reads every weight once per token, so it runs at the
speed of memory, and the fewer bytes a weight takes the faster it goes. Ternary layers stay at
2 bits in memory and run on our kernel (`cpu_kernels`: 2-bit weights x int8 activations), other
integer layers on its int8 sibling; both are unpacked once at load, never per call. Where the
kernels cannot run, codes are unpacked to int8 for `torch._int_mm`, with identical results.
Measured on a 2-core AVX-512 CPU at batch 1 (benchmarks/inference.py, paper-132m blocks):
the 2-bit kernel ~4x faster than `torch._int_mm` on int8, which beats fp32 sgemv, bf16, fp16
and torch's weight-only `_weight_int8pack_mm` (5x slower than fp32 there). Activations are
quantized per token exactly as in training (`quantize_activations`) and integer sums are exact,
so logits match the fake-quantized model up to float rounding. q/k/v and gate/up are fused into
one matmul each, and decoding uses a KV cache.

embedding_dtype: "fp32" keeps floating-point layers as trained, so logits match the training
model. "fp16" halves them; "int8" (default) stores them as per-row absmax int8 and runs the head
as int8 x int8 on 8-bit per-token activations like every other layer: smallest and fastest.
Both move logits by about 1% (relative, measured on a tiny trained model): rounding the
embedding perturbs every activation a little, and activation quantization turns some of those
perturbations into whole code steps.

Activation quantization is discontinuous, so even the fp32 mode matches training only up to
rare code flips: float rounding that differs from training's (integer or fused matmuls
instead of fp32 ones) moves an activation across a rounding boundary now and then, shifting
that sequence's logits by ~1e-4..1e-3. Given identical inputs, every layer's activation codes
are identical to training's and its outputs agree to float rounding (~1e-7).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from ternarylm import cpu_kernels
from ternarylm.errors import UserError
from ternarylm.model import BLOCKS, ModelConfig, RMSNorm, TernaryLM, apply_rope, rope_tables
from ternarylm.quantizers import (FP, Int8, QuantEmbedding, QuantizedWeight, QuantLinear,
                                  activation_codes, quantize_activations)

FORMAT_VERSION = 1
CONFIG_KEY, SHA256_KEY = "ternarylm.config", "ternarylm.sha256"
EMBEDDING_DTYPES = ("int8", "fp16", "fp32")
VOCAB_LAYERS = ("embed", "head")  # the vocabulary matrices, stored at `embedding_dtype`
PACKED_ARTIFACT_PATH = "packed"  # where `pack` logs the file in the trial's MLflow run
# packing -> (base, digits per byte)
PACKINGS: dict[str, tuple[int, int]] = {"2bit": (4, 4), "trit": (3, 5), "4bit": (16, 2),
                                        "8bit": (256, 1)}
FLOAT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# A floating-point layer stored as int8 runs int8 x int8 like the rest, on 8-bit activations.
INT8_FP_ACTIVATION_BITS = 8


class PackError(UserError):
    """A packed file that cannot be written or loaded; the message says why."""


# ---------------------------------------------------------------------------------------------
# Codes <-> bytes


def pack_codes(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """Integer codes (any shape) -> uint8 [ceil(numel / per_byte)]."""
    base, per_byte = PACKINGS[packing]
    digits = codes.flatten().to(torch.int16) + (base - 1) // 2
    # Meta tensors (sizing a model without its weights, `packed_size`) have no values to check.
    if digits.numel() and not digits.is_meta and (digits.min() < 0 or digits.max() >= base):
        raise PackError(f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit {packing}")
    digits = F.pad(digits, (0, -digits.numel() % per_byte))
    powers = base ** torch.arange(per_byte, dtype=torch.int16, device=digits.device)
    return (digits.view(-1, per_byte) * powers).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, packing: str, shape: list[int]) -> torch.Tensor:
    """Inverse of `pack_codes`: int8 codes of `shape`."""
    base, per_byte = PACKINGS[packing]
    # In place on one uint8 array, the size of the result: unpacking a large model leaves no
    # freed temporaries behind to bloat the process.
    digits = packed.unsqueeze(1) // base ** torch.arange(per_byte, dtype=torch.uint8)
    if base < 256:
        digits %= base
    digits -= (base - 1) // 2  # wraps around below 0, which int8 reads as the negative code
    return digits.view(torch.int8).flatten()[:torch.Size(shape).numel()].view(shape)


def _packing(bits: int, trits: bool) -> str:
    return "trit" if bits == 2 and trits else f"{bits}bit"


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class PackResult:
    path: Path
    bytes: int
    sha256: str
    logged_to_run: str | None = None


def _float_dtype(name: str, embedding_dtype: str) -> str:
    """Storage of a layer training kept in floating point: the embedding and head follow
    `embedding_dtype`; a block linear the plan kept in fp stays a float (fp16, or fp32 in the
    exact mode), so that the packed model is the model whose quality was measured."""
    if name in VOCAB_LAYERS or embedding_dtype == "fp32":
        return embedding_dtype
    return "fp16"


def _layer(module: nn.Module, dtype: str, trits: bool) -> tuple[dict, dict]:
    """(table entry, tensors without the layer-name prefix) of one linear or embedding;
    `dtype` is the storage of a floating-point layer (`_float_dtype`)."""
    kind = "embedding" if isinstance(module, nn.Embedding) else "linear"
    shape = list(module.weight.shape)
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        fmt, q = module.format, module.weight_quantizer.quantize(module.weight)
        activation_bits = getattr(module, "activation_bits", None)
    elif dtype == "int8":
        fmt, q = FP, Int8().quantize(module.weight)
        activation_bits = INT8_FP_ACTIVATION_BITS
    else:
        entry = {"kind": kind, "format": FP, "packing": dtype, "shape": shape,
                 "activation_bits": None}
        return entry, {"weight": module.weight.detach().to(FLOAT_DTYPES[dtype])}
    packing = _packing(q.bits, trits)
    entry = {"kind": kind, "format": fmt, "packing": packing, "shape": shape, "bits": q.bits,
             "activation_bits": activation_bits if kind == "linear" else None}
    return entry, {"codes": pack_codes(q.codes, packing), "scale": q.scale.float()}


@torch.no_grad()
def pack_tensors(model: TernaryLM, embedding_dtype: str = "int8",
                 trits: bool = False) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Layer table and tensors of a (plan-applied) model, each layer at its packed width."""
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise PackError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, "
                        f"got {embedding_dtype!r}")
    table: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            entry = {"kind": "norm", "format": FP, "packing": "fp32",
                     "shape": list(module.weight.shape), "activation_bits": None}
            parts = {"weight": module.weight.detach().float()}
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            entry, parts = _layer(module, _float_dtype(name, embedding_dtype), trits)
        else:
            continue
        table[name] = entry
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in parts.items()}
    return table, tensors


def _digest(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def provenance(trial) -> dict[str, Any]:
    """What a packed file records of the trial it came from: the same wherever it is packed
    (worker, `ternarylm pack RUN`, `ternarylm pack DIR`), so the files are byte-identical."""
    return {"trial_key": trial.key(), "scheme": trial.scheme,
            "plan": dataclasses.asdict(trial.plan), "trial": trial.to_dict()}


def packed_contents(model: TernaryLM, tokenizer_json: str, eos_id: int, *,
                    embedding_dtype: str = "int8", trits: bool = False,
                    provenance: dict[str, Any] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of the packed file, exactly as `pack_model` writes them.

    A model on the meta device gives meta tensors of the right shapes and a placeholder
    checksum of the right length: enough to size the file (`packed_size`).
    """
    table, tensors = pack_tensors(model, embedding_dtype, trits)
    config = {"version": FORMAT_VERSION, "model": dataclasses.asdict(model.cfg),
              "embedding_dtype": embedding_dtype, "layers": table, "eos_id": eos_id,
              "tokenizer": tokenizer_json, "provenance": provenance or {}}
    config_json = json.dumps(config, default=str)
    meta = any(t.is_meta for t in tensors.values())
    digest = "0" * 64 if meta else _digest(config_json, tensors)
    return tensors, {CONFIG_KEY: config_json, SHA256_KEY: digest}


def packed_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Bytes of the safetensors file these contents make, by serialising them (meta tensors
    stand in as uninitialised ones of the same shape and dtype)."""
    from safetensors.torch import save

    real = {k: torch.empty(t.shape, dtype=t.dtype) if t.is_meta else t
            for k, t in tensors.items()}
    return len(save(real, metadata=metadata))


def pack_model(model: TernaryLM, path: str | Path, tokenizer: Tokenizer, eos_id: int, *,
               embedding_dtype: str = "int8", trits: bool = False,
               provenance: dict[str, Any] | None = None) -> PackResult:
    """Write the packed file of a (plan-applied) model; returns its path, size and checksum."""
    from safetensors.torch import save_file

    tensors, metadata = packed_contents(model, tokenizer.to_str(), eos_id,
                                        embedding_dtype=embedding_dtype, trits=trits,
                                        provenance=provenance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return PackResult(path, path.stat().st_size, metadata[SHA256_KEY])


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage a loaded model holds (parameters and buffers)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def pack(source: str, out: str | Path | None = None, *, embedding_dtype: str = "int8",
         trits: bool = False) -> PackResult:
    """Pack a finished trial (MLflow run id or trained-model directory).

    A run id's packed file is also logged to that run under `packed/`.
    """
    from ternarylm.artifacts import load_trained

    trained = load_trained(source)
    out = Path(out or f"{Path(source).name}.packed.safetensors")
    result = pack_model(trained.model, out, trained.tokenizer, trained.eos_id,
                        embedding_dtype=embedding_dtype, trits=trits,
                        provenance=provenance(trained.trial))
    if not Path(source).is_dir():  # load_trained accepted it, so it is a run id
        from ternarylm import tracking  # imports mlflow: only when there is a run to log to

        tracking.log_artifact(tracking.tracking_uri(), source, out, PACKED_ARTIFACT_PATH)
        result.logged_to_run = source
    return result


# ---------------------------------------------------------------------------------------------
# Reading


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and packed tensors of a file whose checksum verifies; PackError otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # views of the file's memory map
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise PackError(f"{path} cannot be read: truncated, corrupted or not a safetensors file "
                        f"({e})") from None
    if CONFIG_KEY not in meta or SHA256_KEY not in meta:
        raise PackError(f"{path} is not a packed ternarylm model (no {CONFIG_KEY} metadata); "
                        f"make one with `ternarylm pack`")
    if _digest(meta[CONFIG_KEY], tensors) != meta[SHA256_KEY]:
        raise PackError(f"{path} fails its SHA-256 check: the file was modified or corrupted "
                        f"after packing; refusing to load it (pack the trial again)")
    config = json.loads(meta[CONFIG_KEY])
    if config["version"] != FORMAT_VERSION:
        raise PackError(f"{path} has packed format version {config['version']}; this ternarylm "
                        f"reads version {FORMAT_VERSION}")
    return config, tensors


def unpack_weight(name: str, entry: dict, tensors: dict[str, torch.Tensor]
                  ) -> QuantizedWeight | torch.Tensor:
    """A layer's codes and scales exactly as training quantized them, or its float weight.

    Never a view of `tensors`: one would keep the whole memory-mapped file resident.
    """
    if entry["packing"] in FLOAT_DTYPES:
        return tensors[f"{name}.weight"].clone()
    codes = unpack_codes(tensors[f"{name}.codes"], entry["packing"], entry["shape"])
    return QuantizedWeight(codes, tensors[f"{name}.scale"].clone(), entry["bits"])


# ---------------------------------------------------------------------------------------------
# Inference model


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
    """Int8Linear's result, bit for bit, from `cpu_kernels`: ternary rows at 2 bits, or int8."""

    def __init__(self, rows: torch.Tensor, row_sums: torch.Tensor | None, scale: torch.Tensor,
                 activation_bits: int, in_features: int, fmt: int) -> None:
        super().__init__()
        self.register_buffer("weight", rows.contiguous())  # cpu_kernels.pack_rows layout
        self.register_buffer("row_sums", row_sums)
        self.register_buffer("scale", _per_channel(scale, rows.shape[0]))
        self.activation_bits, self.in_features, self.fmt = activation_bits, in_features, fmt

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, activation_bits: int,
                   fmt: int) -> "KernelLinear":
        row_sums = codes.sum(1, dtype=torch.int32) if fmt == cpu_kernels.INT8 else None
        return cls(cpu_kernels.pack_rows(codes, fmt), row_sums, scale, activation_bits,
                   codes.shape[1], fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[0])
        y = cpu_kernels.linear(x.reshape(-1, self.in_features), self.weight, self.row_sums,
                               self.scale, self.in_features, self.fmt, self.activation_bits)
        return y.view(shape)


class FloatLinear(nn.Module):
    """A layer kept in floating point (fp32 or fp16), computed in its own dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def _linear(w: QuantizedWeight, activation_bits: int | None, use_kernels: bool) -> nn.Module:
    """The fastest exact module for integer codes: our kernels where this CPU runs them."""
    fmt = cpu_kernels.TERNARY if w.bits == 2 else cpu_kernels.INT8
    if use_kernels and _quantizes_to_int8(activation_bits) and cpu_kernels.supports(fmt):
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

    def __init__(self, cfg: ModelConfig, layers: dict[str, nn.Module], prefix: str) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_norm, self.mlp_norm = layers[f"{prefix}.attn_norm"], layers[f"{prefix}.mlp_norm"]
        self.qkv = fuse([layers[f"{prefix}.attn.{p}"] for p in ("q", "k", "v")])
        self.o = layers[f"{prefix}.attn.o"]
        self.gate_up = fuse([layers[f"{prefix}.mlp.{p}"] for p in ("gate", "up")])
        self.down = layers[f"{prefix}.mlp.down"]
        # BitNet blocks (model.BLOCKS): sub-norms before o and down, their gate activation.
        self.activation = BLOCKS[cfg.block].activation
        self.attn_sub_norm = layers.get(f"{prefix}.attn.sub_norm")
        self.mlp_sub_norm = layers.get(f"{prefix}.mlp.sub_norm")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(x)).split(C, dim=-1))  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv[0][:, :, start:start + T], kv[1][:, :, start:start + T] = k, v
            k, v = kv[0][:, :, :start + T], kv[1][:, :, :start + T]
        y = _attend(q, k, v, start).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y if self.attn_sub_norm is None else self.attn_sub_norm(y))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        h = self.activation(gate) * up
        return x + self.down(h if self.mlp_sub_norm is None else self.mlp_sub_norm(h))


class PackedLM(nn.Module):
    """TernaryLM's forward from packed layers (keyed by TernaryLM's module names)."""

    def __init__(self, cfg: ModelConfig, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed, self.norm, self.head = layers["embed"], layers["norm"], layers["head"]
        self.blocks = nn.ModuleList(PackedBlock(cfg, layers, f"blocks.{i}")
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

    use_kernels=False runs integer layers on torch's int8 matmul instead of `cpu_kernels`:
    same results, slower, and ternary layers take 4x the memory.
    """
    config, tensors = read_packed(path)
    layers = {name: _module(name, entry, tensors, use_kernels)
              for name, entry in config["layers"].items()}
    del tensors  # the packed bytes are no longer needed once unpacked
    model = PackedLM(ModelConfig(**config["model"]), layers)
    return PackedModel(model, Tokenizer.from_str(config["tokenizer"]), config["eos_id"], config)
