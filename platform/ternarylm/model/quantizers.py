"""Weight and activation quantizers.

A weight quantizer maps a latent full-precision weight W [out, in] to integer codes and scales,
and gives the dequantized weight the forward pass uses. Gradients reach W through a
straight-through estimator (STE): the rounding is treated as the identity. Each format is one
class in `WEIGHT_FORMATS`; adding a scheme means adding one class.

Ternary schemes (codes in {-1, 0, +1}):
  absmean          BitNet b1.58: gamma = mean|W| per tensor, codes = clamp(round(W / gamma), -1, 1)
  absmean_channel  the same with one gamma per output row
  twn              Ternary Weight Networks: delta = 0.7 mean|W|, alpha = mean|W| over kept weights
  learned          a trainable per-layer scale alpha (LSQ), initialised from absmean
  trilm            TriLM (Spectra): absmean with one gamma per shard of the output rows;
                   trilm_mp2, trilm_mp3, trilm_mp6 are the same with 2, 3 and 6 shards
  paretoq          ParetoQ's stretched elastic quantizer (SEQ): levels 0, +-2/3 alpha of a
                   trainable per-row alpha, LSQ-style gradient
Higher precision for precision plans: int8, int4, int2 (symmetric per-channel absmax,
codes in [-(2^(b-1) - 1), 2^(b-1) - 1]) and fp (no quantization).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternarylm.kernels import cpu

EPS = 1e-5


@dataclass
class QuantizedWeight:
    """Integer codes and the scale that dequantizes them: W_hat = codes * scale."""

    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32, shape [] (per tensor) or [out, 1] (per channel)
    bits: int  # storage width of one code


class _STE(torch.autograd.Function):
    """Returns the dequantized weight forward; passes the gradient to W unchanged backward.

    One autograd node instead of `w + (q - w).detach()` keeps the backward pass free of extra
    elementwise work, which is what keeps simulated ternary training close to FP speed.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        return w_hat

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class WeightQuantizer(nn.Module):
    """Base class: subclasses define `quantize` (codes and scales, no gradient)."""

    name: ClassVar[str]
    bits: ClassVar[int]  # storage bits per code in a packed model
    ternary: ClassVar[bool] = False

    def init_from(self, weight: torch.Tensor) -> None:
        """Initialise any state from the layer's weight (called once by the converter)."""

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        """codes * scale, in the weight's dtype. Subclasses compute it without the int8 round
        trip, in place on one fresh tensor: it runs on every forward pass."""
        q = self.quantize(weight)
        return q.codes.to(weight.dtype) * q.scale.to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _STE.apply(weight, self.dequantized(weight))


class AbsMean(WeightQuantizer):
    name, bits, ternary = "absmean", 2, True

    def _gamma(self, w: torch.Tensor) -> torch.Tensor:
        # The C kernel's mean where it runs (fp32 on CPU): `dequantized` uses it there too, so
        # training's forward and the packed model share the scale's bits on every device.
        gamma = cpu.abs_mean(w)
        return w.abs().mean().float() if gamma is None else gamma

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        gamma = self._gamma(weight)
        codes = torch.clamp(torch.round(weight.float() / (gamma + EPS)), -1, 1).to(torch.int8)
        return QuantizedWeight(codes, gamma, self.bits)

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        if type(self)._gamma is AbsMean._gamma:  # one scale: scale and values in one C call
            w_hat = cpu.fake_quantize_absmean(weight, EPS)
            if w_hat is not None:
                return w_hat
        gamma = self._gamma(weight)
        w_hat = (weight.float() / (gamma + EPS)).round_().clamp_(-1, 1).mul_(gamma)
        return w_hat.to(weight.dtype)


class AbsMeanChannel(AbsMean):
    name = "absmean_channel"

    def _gamma(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().mean(dim=1, keepdim=True).float()


class AbsMeanShards(AbsMean):
    """TriLM (Spectra, Kaushal et al., arXiv 2407.12327): absmean with one gamma per shard.

    Spectra trains with N-way model parallelism and computes the absmean scale of each weight
    matrix per model-parallel shard, so a matrix carries N scales (N = the MP column of its
    table: 1 up to 830M parameters, 2, 3 and 6 above; SpectraSuite README). Here the shards are
    `n_shards` contiguous blocks of output rows (torch.tensor_split: sizes differ by at most
    one row) and each row carries its shard's gamma, so the scale is per row ([out, 1]) and the
    packed format and inference need nothing new. Deviation: in Megatron-style parallelism the
    row-parallel layers (attention output, MLP down) are split along their input columns,
    which would give per-(row, column block) scales that the packed format cannot hold; every
    matrix is split along its output rows here.
    """

    name = "trilm"
    n_shards: ClassVar[int] = 1

    def _gamma(self, w: torch.Tensor) -> torch.Tensor:
        shards = torch.tensor_split(w.abs(), self.n_shards, dim=0)
        return torch.cat([s.mean().float().expand(s.shape[0]) for s in shards]).unsqueeze(1)


def _trilm(n_shards: int) -> type[AbsMeanShards]:
    """The TriLM scheme with `n_shards` scales per matrix, as its own registered class."""
    return type(f"AbsMeanShards{n_shards}", (AbsMeanShards,),
                {"name": f"trilm_mp{n_shards}", "n_shards": n_shards, "__doc__":
                 f"TriLM's absmean with {n_shards} shards (see AbsMeanShards)."})


class TWN(WeightQuantizer):
    name, bits, ternary = "twn", 2, True

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        w = weight.float()
        delta = 0.7 * w.abs().mean()
        keep = w.abs() > delta
        alpha = (w.abs() * keep).sum() / keep.sum().clamp(min=1)
        codes = (torch.sign(w) * keep).to(torch.int8)
        return QuantizedWeight(codes, alpha, self.bits)

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        magnitude = w.abs()
        keep = magnitude > 0.7 * magnitude.mean()
        alpha = magnitude.mul_(keep).sum() / keep.sum().clamp(min=1)
        return torch.sign(w).mul_(keep).mul_(alpha).to(weight.dtype)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `g` (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


class Learned(WeightQuantizer):
    """Learned step size (LSQ, Esser et al. 2020) with a ternary grid: the paper's adaptive scale.

    dL/dalpha = g * sum(dL/dW_hat * s), with s = round(W/alpha) - W/alpha inside [-1, 1] and
    s = clamp(W/alpha, -1, 1) outside it, and g = 1 / sqrt(numel * Qp), Qp = 1.
    W gets the straight-through gradient inside the grid and none outside (LSQ clipping).
    """

    name, bits, ternary = "learned", 2, True

    def __init__(self) -> None:
        super().__init__()
        # Shape [1], not []: DeepSpeed's broadcast over gloo cannot send 0-dim tensors.
        self.scale = nn.Parameter(torch.ones(1))
        # The scale at initialisation, kept to report how far training moved it.
        self.register_buffer("initial_scale", torch.ones(1))

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        gamma = weight.abs().mean().float()
        self.scale.fill_(gamma)
        self.initial_scale.fill_(gamma)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        alpha = self.scale.detach().float().abs() + EPS
        codes = torch.clamp(torch.round(weight.float() / alpha), -1, 1).to(torch.int8)
        return QuantizedWeight(codes, alpha, self.bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(weight.numel() * 1)
        alpha = _ScaleGrad.apply(self.scale.abs() + EPS, g).to(weight.dtype)
        return _RoundSTE.apply(torch.clamp(weight / alpha, -1, 1)) * alpha


SEQ_CLIP = 1 - 1e-2  # ParetoQ's clip_val: keeps 1.5 * x below 1.5, so codes stay in {-1, 0, 1}
SEQ_LEVEL = 2 / 3  # ternary SEQ's non-zero level, as a fraction of alpha


class _StretchedElastic(torch.autograd.Function):
    """ParetoQ's SEQ for ternary, with the gradients of its reference code.

    Forward, with x = W / alpha (alpha per row, at least EPS):
        codes = round(1.5 * clamp(x, -c, c)), c = 0.99  ->  codes in {-1, 0, 1}
        W_hat = codes * (2/3) alpha
    Backward, with G = dL/dW_hat:
        dL/dW     = G where |x| <= c, 0 elsewhere (LSQ clipping)
        dL/dalpha = g * sum_j G_ij * s_ij per row, g = 1 / sqrt(numel(W)),
                    s = codes * 2/3 - x where |x| <= c, sign(x) elsewhere.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        alpha = alpha.clamp(min=EPS).to(w.dtype)
        x = w / alpha
        codes = (x.clamp(-SEQ_CLIP, SEQ_CLIP) * 1.5).round_()
        ctx.save_for_backward(x, codes)
        return codes * (alpha * SEQ_LEVEL)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, codes = ctx.saved_tensors
        inside = x.abs() <= SEQ_CLIP
        s = torch.where(inside, codes * SEQ_LEVEL - x, x.sign())
        grad_alpha = (grad * s).sum(dim=1, keepdim=True) / math.sqrt(x.numel())
        return grad * inside, grad_alpha


class StretchedElastic(WeightQuantizer):
    """ParetoQ ternary (Liu et al., arXiv 2502.02631; facebookresearch/ParetoQ
    models/utils_quant.py `StretchedElasticQuant` with w_bits = 0, and train.py's init).

    ParetoQ's quantized weight is alpha * round(1.5 * clamp(W / alpha, -0.99, 0.99)) / 1.5:
    three levels {-2/3, 0, 2/3} * alpha, "stretched" so the levels split [-alpha, alpha] into
    three equal bins (weights beyond alpha / 3 become non-zero). Writing it as codes * scale
    with codes = round(1.5 * clamp(W / alpha, -0.99, 0.99)) in {-1, 0, 1} and
    scale = 2/3 * alpha gives the packed format's codes * scale exactly. alpha is a trainable
    per-row parameter initialised to max |W| of the row, as ParetoQ does for ternary.

    Gradient (LSQ-style, as ParetoQ's code; see `_StretchedElastic`): note that beyond the clip
    the code uses sign(x) as dW_hat/dalpha where the forward's derivative is 2/3 sign(x), and
    the gradient scale is 1 / sqrt(numel of the matrix) although alpha is per row; both are
    kept as in the reference.
    """

    name, bits, ternary = "paretoq", 2, True

    def __init__(self) -> None:
        super().__init__()
        # Replaced by a per-row parameter in init_from, once the weight's shape is known.
        self.scale = nn.Parameter(torch.ones(1, 1))
        # The QuantizedWeight scale (2/3 alpha) at initialisation, to report how far it moved.
        self.register_buffer("initial_scale", torch.ones(1, 1))

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        alpha = weight.abs().amax(dim=1, keepdim=True).float()
        self.scale = nn.Parameter(alpha)
        self.initial_scale = alpha * SEQ_LEVEL

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        alpha = self.scale.detach().float().clamp(min=EPS)
        x = (weight.float() / alpha).clamp_(-SEQ_CLIP, SEQ_CLIP)
        codes = (x * 1.5).round_().to(torch.int8)
        return QuantizedWeight(codes, alpha * SEQ_LEVEL, self.bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StretchedElastic.apply(weight, self.scale)


class IntN(WeightQuantizer):
    """Symmetric per-output-channel absmax fake quantization to `bits` bits."""

    def __init__(self) -> None:
        super().__init__()
        self.qmax = 2 ** (self.bits - 1) - 1

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        w = weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=EPS) / self.qmax
        codes = torch.clamp(torch.round(w / scale), -self.qmax, self.qmax).to(torch.int8)
        return QuantizedWeight(codes, scale, self.bits)

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_(min=EPS).div_(self.qmax)
        w_hat = (w / scale).round_().clamp_(-self.qmax, self.qmax).mul_(scale)
        return w_hat.to(weight.dtype)


class Int8(IntN):
    name, bits = "int8", 8


class Int4(IntN):
    name, bits = "int4", 4


class Int2(IntN):
    """Two-bit codes {-1, 0, 1} with an absmax scale (unlike the absmean ternary schemes)."""

    name, bits = "int2", 2


# Spectra's model-parallel degrees (SpectraSuite README, "MP" column): 1 is `trilm` itself.
TRILM_SHARDS = (2, 3, 6)
WEIGHT_FORMATS: dict[str, type[WeightQuantizer]] = {
    cls.name: cls for cls in (AbsMean, AbsMeanChannel, TWN, Learned, AbsMeanShards,
                              *map(_trilm, TRILM_SHARDS), StretchedElastic, Int8, Int4, Int2)
}
TERNARY_SCHEMES: tuple[str, ...] = tuple(n for n, c in WEIGHT_FORMATS.items() if c.ternary)
FP = "fp"
FORMATS: tuple[str, ...] = (*WEIGHT_FORMATS, FP)


def format_bits(fmt: str) -> int:
    """Storage bits per weight of a format in a packed model (fp is stored as fp16)."""
    return 16 if fmt == FP else WEIGHT_FORMATS[fmt].bits


def activation_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax codes (as floats) and scales [..., 1]: the one definition that training
    and packed inference share, so their codes are identical."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS).div_(qmax)
    # One new tensor, then in place: this runs on the input of every quantized linear.
    return (x / scale).round_().clamp_(-qmax - 1, qmax), scale


class _ActQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        return fake_quantized_activations(x, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantized_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """codes * scale of `activation_codes` (no gradient): one pass of the C kernel where it
    runs (fp32 on an AVX2 CPU), torch's five operations elsewhere, the same bits either way."""
    out = cpu.fake_quantize_activations(x, bits)
    if out is None:
        codes, scale = activation_codes(x, bits)
        out = codes.mul_(scale)
    return out


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token absmax fake quantization of activations (BitNet), straight-through backward."""
    return _ActQuantSTE.apply(x, bits)


class _SharedInputCache:
    """The fake-quantized values of the last input seen: q, k and v (and gate and up) read the
    same tensor, so its activation codes are computed once per block instead of three times.

    Keyed on the tensor object (held weakly) and its version counter, so an input written in
    place in between, or a new tensor at a recycled address, is quantized afresh."""

    def __init__(self) -> None:
        self.key: tuple[weakref.ref, int, int] | None = None
        self.value: torch.Tensor | None = None

    @torch.no_grad()
    def quantized(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if x.is_inference():  # inference tensors carry no version counter: no caching
            return fake_quantized_activations(x, bits)
        if self.key is not None and self.key[0]() is x and self.key[1:] == (x._version, bits):
            return self.value
        value = fake_quantized_activations(x, bits)  # first: a failure leaves no stale key
        self.key, self.value = (weakref.ref(x), x._version, bits), value
        return value


_SHARED_INPUT = _SharedInputCache()


class _FakeQuantLinear(torch.autograd.Function):
    """F.linear(x_hat, w_hat, bias) forward; backward as a linear whose input and weight were
    x and w (the straight-through estimator of both quantizers).

    One autograd node in place of three (activation STE, weight STE, the linear's own), which
    is most of what fake quantization costs on small matrices. Gradients are computed with the
    same matrix products autograd uses for F.linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_hat, w_hat)
        ctx.has_bias = bias is not None
        return F.linear(x_hat, w_hat, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, w_hat = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(w_hat)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x_hat.reshape(-1, x_hat.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _AdoptsWeight:
    """What QuantLinear and QuantEmbedding share: a latent weight and its quantizer."""

    weight_quantizer: WeightQuantizer

    @property
    def format(self) -> str:
        return self.weight_quantizer.name

    def _adopt(self, weight: nn.Parameter) -> None:
        """Take over an existing parameter object (a tied head stays tied, nothing is copied)
        and initialise the quantizer from it."""
        self.weight = weight
        self.weight_quantizer.to(weight.device)
        self.weight_quantizer.init_from(weight)


class QuantLinear(_AdoptsWeight, nn.Linear):
    """nn.Linear whose weight (and optionally input) is fake-quantized in the forward pass.

    The latent weight stays in `weight`, so state dicts keep the names of the model they came
    from; a learned scale lives at `<name>.weight_quantizer.scale`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 weight_quantizer: WeightQuantizer, activation_bits: int | None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer = weight_quantizer
        self.activation_bits = activation_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer,
                    activation_bits: int | None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, False, weight_quantizer,
                activation_bits, device="meta")
        q.bias = linear.bias
        q._adopt(linear.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.weight_quantizer
        if type(quantizer).forward is not WeightQuantizer.forward:  # its own gradient
            if self.activation_bits is not None:
                x = quantize_activations(x, self.activation_bits)
            return F.linear(x, quantizer(self.weight), self.bias)
        # Straight-through weight and input: one fused node (see _FakeQuantLinear).
        x_hat = x if self.activation_bits is None else _SHARED_INPUT.quantized(
            x, self.activation_bits)
        return _FakeQuantLinear.apply(x, self.weight, self.bias, x_hat,
                                      quantizer.dequantized(self.weight))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format}, activation_bits={self.activation_bits}"


class QuantEmbedding(_AdoptsWeight, nn.Embedding):
    """nn.Embedding whose table is fake-quantized per row (a row is one token's vector)."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 weight_quantizer: WeightQuantizer, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.weight_quantizer = weight_quantizer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding,
                       weight_quantizer: WeightQuantizer) -> "QuantEmbedding":
        q = cls(embedding.num_embeddings, embedding.embedding_dim, weight_quantizer,
                device="meta")
        q._adopt(embedding.weight)
        return q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_quantizer(self.weight))
