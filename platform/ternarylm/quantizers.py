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
Higher precision for precision plans: int8, int4, int2 (symmetric per-channel absmax,
codes in [-(2^(b-1) - 1), 2^(b-1) - 1]) and fp (no quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        return w.abs().mean().float()

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        gamma = self._gamma(weight)
        codes = torch.clamp(torch.round(weight.float() / (gamma + EPS)), -1, 1).to(torch.int8)
        return QuantizedWeight(codes, gamma, self.bits)

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        gamma = self._gamma(weight)
        w_hat = (weight.float() / (gamma + EPS)).round_().clamp_(-1, 1).mul_(gamma)
        return w_hat.to(weight.dtype)


class AbsMeanChannel(AbsMean):
    name = "absmean_channel"

    def _gamma(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().mean(dim=1, keepdim=True).float()


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


WEIGHT_FORMATS: dict[str, type[WeightQuantizer]] = {
    cls.name: cls for cls in (AbsMean, AbsMeanChannel, TWN, Learned, Int8, Int4, Int2)
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
        codes, scale = activation_codes(x, bits)
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token absmax fake quantization of activations (BitNet), straight-through backward."""
    return _ActQuantSTE.apply(x, bits)


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
        if self.activation_bits is not None:
            x = quantize_activations(x, self.activation_bits)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

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
