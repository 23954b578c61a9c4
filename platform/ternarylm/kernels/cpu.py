"""CPU kernels for packed linears: ternary (2-bit) or int8 weights times int8 activations.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth: 2-bit
weights read 16x fewer bytes than fp32, int8 ones 4x. torch has no 2-bit kernel, and its int8
matmul (`torch._int_mm`) reaches a fraction of the bandwidth at batch 1, so this module
compiles its own (C, on first use, with the system C compiler, about a second) and calls them
through ctypes. Where that fails (no compiler, a CPU without AVX2) packed models fall back to
torch's int8 matmul, with identical results.

Each call quantizes the activations per token with the same float operations as training
(`quantizers.quantize_activations`), so the codes are identical, then sums integer products
exactly in int32 and scales: y[m, n] = dot[m, n] * (a_scale[m] * w_scale[n]).

Decoding one token at batch 1, a block's remaining work (norms, RoPE, attention over the
cache, the gated MLP's activation, residual adds) is a few thousand floats, and torch's cost
per operation, some sixty of them per block, outweighed the weights: `decode_block` runs the
whole block in one call (`DecodeBlock`), 7.5 -> 4.5 ms per token on paper-132m, 1 thread.

Training uses two of them on CPU: fake quantization of activations (per token) and of absmean
weights in one pass each, where torch makes five (`fake_quantize_activations`,
`fake_quantize_absmean`, whose scale `abs_mean` packing uses too); same float operations,
same bits, and torch's path where they cannot run.

Ternary layout: a row's codes, padded with zeros to a multiple of 256, as digits
d = code + 1 in {0, 1, 2}; byte j of the row's 64-byte block b holds the digits of
k = 256 b + j + 64 s at bits 2s..2s+1 (s = 0..3), so four shifts and masks give four runs of
64 consecutive digits, ready for a u8 x s8 dot product: sum code a = sum d a - sum a.
Int8 layout: a row's codes padded with zeros to a multiple of 64; with u = a + 128 (unsigned),
sum code a = sum code u - 128 sum code. The int8 kernel needs AVX-512 VNNI.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

TERNARY, INT8 = 0, 1  # weight formats, as the C code numbers them
BLOCK = {TERNARY: 256, INT8: 64}  # rows are padded to a multiple of this many weights
AVX2, AVX512_VNNI = 1, 2  # CPU levels

# The C source ships beside this module (package data); its text is part of the library's name.
SOURCE_PATH = Path(__file__).parent / "kernels.c"
SOURCE = SOURCE_PATH.read_text()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ternarylm" / "kernels"


# No -ffast-math, no FMA contraction: the activation quantization must round exactly as torch
# does, and the decode block follow torch's float operations.
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]


def _compile() -> Path:
    """The shared library, compiled once per source and flags (atomically: parallel loads
    race)."""
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    library = _cache_dir() / f"kernels-{digest}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        source, built = Path(d) / "kernels.c", Path(d) / "kernels.so"
        source.write_text(SOURCE)
        subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(source), "-o", str(built),
                        "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(built, library)
    return library


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("w_sum", ctypes.c_void_p), ("w_scale", ctypes.c_void_p),
                ("n", ctypes.c_int), ("k", ctypes.c_int), ("kp", ctypes.c_int),
                ("format", ctypes.c_int), ("qmax", ctypes.c_int)]


class _Block(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("attn_sub_norm", ctypes.c_void_p), ("mlp_sub_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("sub_eps", ctypes.c_float), ("width", ctypes.c_int),
                ("heads", ctypes.c_int), ("hidden", ctypes.c_int), ("relu2", ctypes.c_int)]


@cache
def _library() -> tuple[ctypes.CDLL, int] | None:
    try:
        lib = ctypes.CDLL(str(_compile()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"CPU kernels unavailable ({detail.strip()[:300]}); packed models use "
                      f"torch's int8 matmul and training torch's fake quantization instead")
        return None
    level = lib.cpu_level()
    if level == 0:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.quantized_linear.argtypes = [p, i, i, p, p, p, i, i, i, i, p, i, i]
    lib.quantized_linear.restype = i
    lib.decode_block.argtypes = [ctypes.POINTER(_Block), p, p, p, i, i, p, p, p, i, i]
    lib.decode_block.restype = i
    f, long = ctypes.c_float, ctypes.c_long
    lib.abs_mean.argtypes = [p, long]
    lib.abs_mean.restype = f
    lib.fake_quantize_absmean.argtypes = [p, long, f, p]
    lib.fake_quantize_absmean.restype = f
    lib.fake_quantize_rows.argtypes = [p, long, long, i, p]
    lib.fake_quantize_rows.restype = None
    return lib, level


def supports(fmt: int) -> bool:
    """Whether the kernels compiled and this CPU runs the one for `fmt` (TERNARY or INT8)."""
    library = _library()
    return library is not None and library[1] >= (AVX2 if fmt == TERNARY else AVX512_VNNI)


def _fake_quantizes(t: torch.Tensor) -> bool:
    """Whether `t` can take the fake-quantization kernels (non-empty fp32 on an AVX2 CPU)."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0
            and supports(TERNARY))


def abs_mean(weight: torch.Tensor) -> torch.Tensor | None:
    """mean |weight| (fp32, 0-dim), summed in double; None where the kernels cannot run."""
    if not _fake_quantizes(weight):
        return None
    weight = weight.detach().contiguous()
    return torch.tensor(_library()[0].abs_mean(weight.data_ptr(), weight.numel()),
                        dtype=torch.float32)


def fake_quantize_absmean(weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """clamp(round(weight / (gamma + eps)), -1, 1) * gamma with gamma = `abs_mean(weight)`, in
    two passes over the weight; None where the kernels cannot run."""
    if not _fake_quantizes(weight):
        return None
    weight = weight.detach().contiguous()
    out = torch.empty_like(weight)
    _library()[0].fake_quantize_absmean(weight.data_ptr(), weight.numel(), eps, out.data_ptr())
    return out


def fake_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor | None:
    """Per-token absmax codes times scales (`quantizers.activation_codes`), bit for bit, in one
    pass over x; None where the kernels cannot run."""
    if not _fake_quantizes(x):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    _library()[0].fake_quantize_rows(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                                     _qmax(bits), out.data_ptr())
    return out


def pack_rows(codes: torch.Tensor, fmt: int) -> torch.Tensor:
    """Integer codes [N, K] (int8) -> uint8 rows [N, bytes per row] in the format's layout."""
    n, k = codes.shape
    kp = -(-k // BLOCK[fmt]) * BLOCK[fmt]
    if fmt == INT8:
        return F.pad(codes, (0, kp - k)).view(torch.uint8)
    digits = F.pad(codes + 1, (0, kp - k)).view(torch.uint8).view(n, kp // 256, 4, 64)
    packed = digits[:, :, 0] | digits[:, :, 1] << 2 | digits[:, :, 2] << 4 | digits[:, :, 3] << 6
    return packed.reshape(n, kp // 4)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _padded_length(rows: torch.Tensor, fmt: int) -> int:
    """Codes per packed row (the row length padded to the format's block)."""
    return rows.shape[1] * (4 if fmt == TERNARY else 1)


def _qmax(activation_bits: int) -> int:
    return 2 ** (activation_bits - 1) - 1


def linear(x: torch.Tensor, rows: torch.Tensor, row_sums: torch.Tensor | None,
           scale: torch.Tensor, in_features: int, fmt: int, activation_bits: int) -> torch.Tensor:
    """x [M, K] -> [M, N]: per-token quantized activations times packed rows, scaled per row.

    row_sums: each row's code sum (int32 [N]), needed by INT8 rows only.
    """
    lib, level = _library()
    x = x.float().contiguous()
    m, n = x.shape[0], rows.shape[0]
    y = torch.empty(m, n)
    status = lib.quantized_linear(
        x.data_ptr(), m, in_features, rows.data_ptr(), _ptr(row_sums), scale.data_ptr(), n,
        _padded_length(rows, fmt), fmt, _qmax(activation_bits), y.data_ptr(),
        torch.get_num_threads(), level)
    if status:
        raise MemoryError("kernels.cpu: no memory for the quantized activations")
    return y


@dataclass
class PackedRows:
    """One packed linear as `linear` takes it: rows in the format's layout, per-row scales
    (fp32 [N]), code sums per row (INT8 only)."""

    rows: torch.Tensor
    row_sums: torch.Tensor | None
    scale: torch.Tensor
    in_features: int
    fmt: int
    activation_bits: int

    def spec(self) -> _Linear:
        return _Linear(self.rows.data_ptr(), _ptr(self.row_sums), self.scale.data_ptr(),
                       self.rows.shape[0], self.in_features,
                       _padded_length(self.rows, self.fmt), self.fmt,
                       _qmax(self.activation_bits))


class DecodeBlock:
    """One block's decode step (batch 1, one token, KV cache) in a single C call: what
    `inference.PackedBlock` computes for that case with some sixty torch operations.

    Holds raw pointers to the block's tensors: build it after the model's last move."""

    def __init__(self, qkv: PackedRows, o: PackedRows, gate_up: PackedRows, down: PackedRows,
                 norms: dict[str, tuple[torch.Tensor, float] | None], heads: int,
                 relu2: bool, seq_len: int) -> None:
        width, hidden = o.rows.shape[0], down.in_features
        self._keep = (qkv, o, gate_up, down, norms)  # the tensors the pointers point into
        sub = norms["attn_sub_norm"] or norms["mlp_sub_norm"]
        self.spec = _Block(qkv.spec(), o.spec(), gate_up.spec(), down.spec(),
                           *(_ptr(norms[n][0] if norms[n] else None)
                             for n in ("attn_norm", "mlp_norm", "attn_sub_norm", "mlp_sub_norm")),
                           norms["attn_norm"][1], sub[1] if sub else 0.0, width, heads, hidden,
                           int(relu2))
        self.scratch = torch.empty(5 * width + 3 * hidden + seq_len)

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [1, 1, width] at position `pos`; keys, values [1, heads, seq_len, D] (written at
        `pos`); cos, sin [D/2] of `pos`. Returns the block's output, a new tensor."""
        lib, level = _library()
        out = x.clone()
        if lib.decode_block(ctypes.byref(self.spec), out.data_ptr(), keys.data_ptr(),
                            values.data_ptr(), keys.shape[2], pos, cos.data_ptr(),
                            sin.data_ptr(), self.scratch.data_ptr(), torch.get_num_threads(),
                            level):
            raise MemoryError("kernels.cpu: no memory for the quantized activations")
        return out
