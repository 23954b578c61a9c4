"""Packed ternary models: one small file for deployment (its inference model is `inference`).

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

embedding_dtype: "fp32" keeps floating-point layers as trained, so logits match the training
model. "fp16" halves them; "int8" (default) stores them as per-row absmax int8 and runs the head
as int8 x int8 on 8-bit per-token activations like every other layer: smallest and fastest.
Both move logits by about 1% (relative, measured on a tiny trained model): rounding the
embedding perturbs every activation a little, and activation quantization turns some of those
perturbations into whole code steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ternarylm.core.errors import UserError
from ternarylm.model.transformer import LayerSpec, TernaryLM
from ternarylm.model.plans import ConvertedLayer, convert
from ternarylm.model.quantizers import FP, Int8, QuantizedWeight

FORMAT_VERSION = 1
CONFIG_KEY, SHA256_KEY = "ternarylm.config", "ternarylm.sha256"
EMBEDDING_DTYPES = ("int8", "fp16", "fp32")
VOCAB_ROLES = ("embedding", "head")  # the vocabulary matrices, stored at `embedding_dtype`
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


def _float_dtype(spec: LayerSpec, embedding_dtype: str) -> str:
    """Storage of a layer training kept in floating point: the embedding and head follow
    `embedding_dtype`; a block linear the plan kept in fp stays a float (fp16, or fp32 in the
    exact mode), so that the packed model is the model whose quality was measured."""
    if spec.role in VOCAB_ROLES or embedding_dtype == "fp32":
        return embedding_dtype
    return "fp16"


def _layer(layer: ConvertedLayer, dtype: str, trits: bool) -> tuple[dict, dict]:
    """(table entry, tensors without the layer-name prefix) of one converted weight; `dtype`
    is the storage of a floating-point linear or embedding (`_float_dtype`)."""
    kind, shape = layer.spec.kind, list(layer.weight.shape)
    if kind == "norm":
        entry = {"kind": kind, "format": FP, "packing": "fp32", "shape": shape,
                 "activation_bits": None}
        return entry, {"weight": layer.weight.float()}
    fmt, q, activation_bits = layer.format, layer.quantized, layer.activation_bits
    if q is None and dtype == "int8":
        q, activation_bits = Int8().quantize(layer.weight), INT8_FP_ACTIVATION_BITS
    elif q is None:
        entry = {"kind": kind, "format": FP, "packing": dtype, "shape": shape,
                 "activation_bits": None}
        return entry, {"weight": layer.weight.to(FLOAT_DTYPES[dtype])}
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
    for name, layer in convert(model).items():
        table[name], parts = _layer(layer, _float_dtype(layer.spec, embedding_dtype), trits)
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
    tensors, metadata = packed_contents(model, tokenizer.to_str(), eos_id,
                                        embedding_dtype=embedding_dtype, trits=trits,
                                        provenance=provenance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_bytes(tensors, metadata))
    return PackResult(path, path.stat().st_size, metadata[SHA256_KEY])


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors` and `metadata`, its metadata in sorted key order.

    safetensors keeps the metadata in a Rust HashMap, whose order differs from one map to the
    next, within one process too: the same model packed twice gave files that differed in the
    header (which key came first). Written again with sorted keys, the header (and so the file)
    is a function of the contents. Tensor offsets count from the end of the header, so the data
    is kept as is.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + raw[8 + size:]


def pack(source: str, out: str | Path | None = None, *, embedding_dtype: str = "int8",
         trits: bool = False) -> PackResult:
    """Pack a finished trial (MLflow run id or trained-model directory).

    A run id's packed file is also logged to that run under `packed/`.
    """
    from ternarylm.deploy.artifacts import load_trained, run_id_of

    trained = load_trained(source)
    out = Path(out or f"{Path(source).name}.packed.safetensors")
    result = pack_model(trained.model, out, trained.tokenizer, trained.eos_id,
                        embedding_dtype=embedding_dtype, trits=trits,
                        provenance=provenance(trained.trial))
    if run_id_of(source) is not None:
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
