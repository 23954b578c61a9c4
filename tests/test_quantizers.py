"""Weight and activation quantizers against hand-computed examples, their codes and gradients.

Every expected code and scale below is worked out by hand in the comments (no value is copied
from running the code). The examples avoid exact .5 ratios, where round-half-to-even would make
the hand computation depend on floating-point noise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ternarylm.kernels import cpu
from ternarylm.model.quantizers import (
    EPS,
    FORMATS,
    FP,
    TERNARY_SCHEMES,
    TRILM_SHARDS,
    TWN,
    WEIGHT_FORMATS,
    AbsMean,
    AbsMeanChannel,
    AbsMeanShards,
    Int2,
    Int4,
    Int8,
    Learned,
    QuantEmbedding,
    QuantLinear,
    StretchedElastic,
    activation_codes,
    fake_quantized_activations,
    format_bits,
    quantize_activations,
)

# Rows of very different magnitude, so per-tensor and per-row scales give different codes.
W_MIXED = [[0.5, -0.1, 0.0, 1.1],
           [-0.06, 0.01, 0.03, -0.09]]
# Rows of similar magnitude.
W_EVEN = [[0.5, -0.1, 0.0, 1.1],
          [-0.6, 0.1, 0.3, -0.9]]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(a, b, tol=1e-6) -> None:
    """Elementwise a == b within tol; a one-element scale compares with a Python number."""
    a = torch.as_tensor(a, dtype=torch.float32).detach()
    b = torch.as_tensor(b, dtype=torch.float32)
    if a.numel() == b.numel() == 1:
        a, b = a.reshape(()), b.reshape(())
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- registry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_every_registered_format_keeps_its_declared_bits_and_flags(name):
    """What each format declares (its bits, whether it is ternary) is what its quantizer does:
    codes fit in `bits` signed bits, a ternary scheme's codes are -1, 0 and 1 with all three
    used, an integer format's absmax scale maps each row's largest weight to its largest code,
    and the dequantized weight is codes times scale, as packing stores it."""
    quantizer = WEIGHT_FORMATS[name]()
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    quantizer.init_from(weight)
    q = quantizer.quantize(weight)
    qmax = 2 ** (format_bits(name) - 1) - 1
    assert q.bits == format_bits(name) and q.codes.dtype == torch.int8
    assert q.codes.abs().max() <= max(qmax, 1)
    assert (name in TERNARY_SCHEMES) == quantizer.ternary
    if quantizer.ternary:
        assert set(q.codes.unique().tolist()) == {-1, 0, 1}
    else:
        assert (q.codes.abs().amax(dim=1) == qmax).all()
    assert torch.allclose(quantizer.dequantized(weight), q.codes.float() * q.scale, atol=1e-6)


def test_trilm_shard_counts_follow_their_names():
    for n in TRILM_SHARDS:
        assert WEIGHT_FORMATS[f"trilm_mp{n}"].n_shards == n
    assert AbsMeanShards.n_shards == 1
    assert set(FORMATS) == {*WEIGHT_FORMATS, FP} and format_bits(FP) == 16


# --- hand-computed codes and scales ------------------------------------------------------------

def test_absmean_per_tensor_hand_example():
    # mean|W| = (0.5 + 0.1 + 0 + 1.1 + 0.06 + 0.01 + 0.03 + 0.09) / 8 = 1.89 / 8 = 0.23625
    # W / gamma: row 0 = 2.12, -0.42, 0, 4.66 -> 1, 0, 0, 1 (clamped)
    #            row 1 = -0.25, 0.04, 0.13, -0.38 -> all 0: the small row vanishes per tensor
    q = AbsMean().quantize(t(W_MIXED))
    assert q.codes.dtype == torch.int8 and q.bits == 2
    assert q.codes.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]
    close(q.scale, 1.89 / 8)
    assert q.scale.numel() == 1


def test_absmean_channel_hand_example():
    # row 0: gamma = (0.5 + 0.1 + 0 + 1.1) / 4 = 0.425; W / gamma = 1.18, -0.24, 0, 2.59
    #        -> 1, 0, 0, 1
    # row 1: gamma = (0.06 + 0.01 + 0.03 + 0.09) / 4 = 0.0475; W / gamma = -1.26, 0.21, 0.63, -1.89
    #        -> -1, 0, 1, -1
    q = AbsMeanChannel().quantize(t(W_MIXED))
    assert q.codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, -1]]
    assert q.scale.shape == (2, 1)
    close(q.scale, [[0.425], [0.0475]])


def test_twn_hand_example():
    # mean|W| = (0.5 + 0.1 + 0 + 1.1 + 0.6 + 0.1 + 0.3 + 0.9) / 8 = 3.6 / 8 = 0.45
    # delta = 0.7 * 0.45 = 0.315; kept (|w| > delta): 0.5, 1.1, -0.6, -0.9 (0.3 is dropped)
    # alpha = (0.5 + 1.1 + 0.6 + 0.9) / 4 = 0.775
    q = TWN().quantize(t(W_EVEN))
    assert q.codes.tolist() == [[1, 0, 0, 1], [-1, 0, 0, -1]]
    close(q.scale, 3.1 / 4)


def test_twn_differs_from_absmean_on_the_same_weight():
    # absmean on W_EVEN: gamma = 0.45; 0.3 / 0.45 = 0.67 rounds to 1 where TWN's threshold drops it
    q = AbsMean().quantize(t(W_EVEN))
    assert q.codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, -1]]
    close(q.scale, 0.45)


def test_learned_init_and_codes_hand_example():
    quantizer = Learned()
    quantizer.init_from(t(W_EVEN))
    # initialised from absmean: 3.6 / 8 = 0.45, and the initial value is remembered
    close(quantizer.scale.detach(), 0.45)
    close(quantizer.initial_scale, 0.45)
    # alpha = 0.4: [0.5, -0.1, 0, 1.1] / 0.4 = 1.25, -0.25, 0, 2.75 -> 1, 0, 0, 1
    #              [-0.6, 0.1, 0.3, -0.9] / 0.4 = -1.5 (clamped to -1 either way), 0.25, 0.75,
    #              -2.25 -> -1, 0, 1, -1
    with torch.no_grad():
        quantizer.scale.fill_(0.4)
    q = quantizer.quantize(t(W_EVEN))
    assert q.codes.tolist() == [[1, 0, 0, 1], [-1, 0, 1, -1]]
    close(q.scale, 0.4, tol=1e-4)
    # the differentiable forward produces the same dequantized weight
    close(quantizer(t(W_EVEN)).detach(), q.codes.float() * 0.4, tol=1e-4)


# Four rows for the sharded scheme: |W| row sums 1.7, 0.19, 1.9, 0.65.
W_FOUR = [*W_MIXED, W_EVEN[1], [0.2, -0.05, 0.4, 0.0]]


def test_trilm_one_shard_is_per_tensor_absmean():
    # one shard: gamma = (1.7 + 0.19) / 8 = 0.23625 for both rows, as test_absmean_per_tensor
    q = WEIGHT_FORMATS["trilm"]().quantize(t(W_MIXED))
    assert q.codes.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]
    assert q.scale.shape == (2, 1)  # one value per row, for the packed format
    close(q.scale, [[0.23625], [0.23625]])


def test_trilm_two_shards_hand_example():
    # rows 0-1: gamma = (1.7 + 0.19) / 8 = 0.23625 -> row 0: 2.12, -0.42, 0, 4.66 -> 1, 0, 0, 1
    #                                                 row 1: all |.| < 0.4 -> 0
    # rows 2-3: gamma = (1.9 + 0.65) / 8 = 0.31875
    #   row 2: -1.88, 0.31, 0.94, -2.82 -> -1, 0, 1, -1
    #   row 3: 0.63, -0.16, 1.25, 0 -> 1, 0, 1, 0
    q = WEIGHT_FORMATS["trilm_mp2"]().quantize(t(W_FOUR))
    assert q.codes.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [-1, 0, 1, -1], [1, 0, 1, 0]]
    close(q.scale, [[0.23625], [0.23625], [0.31875], [0.31875]])


def test_trilm_uneven_shards_hand_example():
    # 4 rows in 3 shards: rows {0, 1}, {2}, {3} (the first shard takes the extra row)
    # row 2 alone: gamma = 1.9 / 4 = 0.475: -1.26, 0.21, 0.63, -1.89 -> -1, 0, 1, -1
    # row 3 alone: gamma = 0.65 / 4 = 0.1625: 1.23, -0.31, 2.46, 0 -> 1, 0, 1, 0
    q = WEIGHT_FORMATS["trilm_mp3"]().quantize(t(W_FOUR))
    assert q.codes.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [-1, 0, 1, -1], [1, 0, 1, 0]]
    close(q.scale, [[0.23625], [0.23625], [0.475], [0.1625]])
    # six shards of four rows: two are empty, each row is its own shard (= absmean_channel)
    q6 = WEIGHT_FORMATS["trilm_mp6"]().quantize(t(W_FOUR))
    channel = AbsMeanChannel().quantize(t(W_FOUR))
    assert torch.equal(q6.codes, channel.codes)
    close(q6.scale, channel.scale)


def paretoq(alpha_rows) -> StretchedElastic:
    quantizer = StretchedElastic()
    quantizer.init_from(t(W_EVEN))
    with torch.no_grad():
        quantizer.scale.copy_(t(alpha_rows))
    return quantizer


def test_paretoq_init_is_the_row_absmax():
    quantizer = StretchedElastic()
    quantizer.init_from(t(W_EVEN))
    # row maxima |W|: 1.1 and 0.9; the reported initial scale is the level 2/3 alpha
    close(quantizer.scale.detach(), [[1.1], [0.9]])
    close(quantizer.initial_scale, [[1.1 * 2 / 3], [0.9 * 2 / 3]])
    assert [n for n, _ in quantizer.named_parameters()] == ["scale"]


def test_paretoq_hand_example():
    # alpha = 0.5 (row 0), 2.0 (row 1); x = W / alpha, clamped to +-0.99, times 1.5, rounded:
    # row 0: x = 1.0, -0.2, 0, 2.2 -> 0.99, -0.2, 0, 0.99 -> 1.485, -0.3, 0, 1.485 -> 1, 0, 0, 1
    # row 1: x = -0.3, 0.05, 0.15, -0.45 -> -0.45, 0.075, 0.225, -0.675 -> 0, 0, 0, -1
    # scale = 2/3 alpha: 1/3 and 4/3; the weights between alpha/3 and alpha all get a code
    quantizer = paretoq([[0.5], [2.0]])
    q = quantizer.quantize(t(W_EVEN))
    assert q.codes.dtype == torch.int8 and q.bits == 2
    assert q.codes.tolist() == [[1, 0, 0, 1], [0, 0, 0, -1]]
    close(q.scale, [[1 / 3], [4 / 3]])
    # ParetoQ's dequantized weight alpha * round(1.5 clamp(x)) / 1.5 is codes * scale
    close(quantizer(t(W_EVEN)).detach(), [[1 / 3, 0, 0, 1 / 3], [0, 0, 0, -4 / 3]])


def test_paretoq_gradients_match_the_seq_formulas():
    quantizer = paretoq([[0.5], [2.0]])
    w = t(W_EVEN).requires_grad_()
    (quantizer(w) * t(UPSTREAM)).sum().backward()
    # x = W / alpha as above; inside the clip |x| <= 0.99: row 0 only x = -0.2 and 0
    inside = t([[0, 1, 1, 0], [1, 1, 1, 1]])
    close(w.grad, t(UPSTREAM) * inside, tol=0)
    # s = codes * 2/3 - x inside, sign(x) outside:
    # row 0: s = 1, 0 - (-0.2), 0 - 0, 1 -> sum G s = 1 - 0.4 + 0 + 0.5 = 1.1
    # row 1: s = 0.3, -0.05, -0.15, -2/3 + 0.45 -> sum G s = -0.45 - 0.2 - 0.3 + 0.65 = -0.3
    # dalpha = sum / sqrt(numel = 8)
    close(quantizer.scale.grad, [[1.1 / math.sqrt(8)], [-0.3 / math.sqrt(8)]], tol=1e-6)


def test_paretoq_linear_round_trip_and_tiny_alpha():
    torch.manual_seed(9)
    linear = nn.Linear(12, 6, bias=False)
    q = QuantLinear.from_linear(linear, StretchedElastic(), activation_bits=None)
    assert q.weight_quantizer.scale.shape == (6, 1)
    assert set(dict(q.named_parameters())) == {"weight", "weight_quantizer.scale"}
    # a scale driven to zero or below is held at EPS: codes stay ternary, values finite
    with torch.no_grad():
        q.weight_quantizer.scale[0] = -1.0
    codes = q.weight_quantizer.quantize(q.weight).codes
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.isfinite(q(torch.randn(3, 12))).all()
    close(q.weight_quantizer.quantize(q.weight).scale[0], EPS * 2 / 3)


INT_CASES = {
    # row 0: absmax 1.1, row 1: absmax 0.9; code = round(w * qmax / absmax)
    "int8": (Int8, 127, [[58, -12, 0, 127], [-85, 14, 42, -127]]),
    # 0.5*127/1.1 = 57.73, -0.1*127/1.1 = -11.55; -0.6*127/0.9 = -84.67, 0.1*127/0.9 = 14.11,
    # 0.3*127/0.9 = 42.33
    "int4": (Int4, 7, [[3, -1, 0, 7], [-5, 1, 2, -7]]),
    # 0.5*7/1.1 = 3.18, -0.1*7/1.1 = -0.64; -0.6*7/0.9 = -4.67, 0.1*7/0.9 = 0.78, 0.3*7/0.9 = 2.33
    "int2": (Int2, 1, [[0, 0, 0, 1], [-1, 0, 0, -1]]),
    # 0.5/1.1 = 0.45, -0.1/1.1 = -0.09; -0.6/0.9 = -0.67, 0.1/0.9 = 0.11, 0.3/0.9 = 0.33
}


@pytest.mark.parametrize("fmt", list(INT_CASES))
def test_intn_per_channel_absmax_hand_example(fmt):
    cls, qmax, codes = INT_CASES[fmt]
    quantizer = cls()
    assert quantizer.qmax == qmax and cls.name == fmt
    q = quantizer.quantize(t(W_EVEN))
    assert q.codes.dtype == torch.int8
    assert q.codes.tolist() == codes
    close(q.scale, [[1.1 / qmax], [0.9 / qmax]])
    # the forward pass returns codes * scale
    close(quantizer(t(W_EVEN)).detach(), t(codes) * t([[1.1 / qmax], [0.9 / qmax]]))


@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_forward_is_codes_times_scale(fmt):
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.05
    quantizer = WEIGHT_FORMATS[fmt]()
    quantizer.init_from(w)
    q = quantizer.quantize(w)
    close(quantizer(w).detach(), q.codes.float() * q.scale, tol=1e-5)


# --- code ranges -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_codes_stay_in_range(fmt):
    torch.manual_seed(1)
    w = torch.randn(64, 96) * 0.02
    w[3, 5], w[7, 1] = 1.0, -2.0  # outliers
    quantizer = WEIGHT_FORMATS[fmt]()
    quantizer.init_from(w)
    codes = quantizer.quantize(w).codes
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    if WEIGHT_FORMATS[fmt].ternary:
        assert set(codes.unique().tolist()) == {-1, 0, 1}
    else:
        qmax = 2 ** (WEIGHT_FORMATS[fmt].bits - 1) - 1
        assert int(codes.abs().max()) == qmax  # the absmax element of each row hits qmax
        assert int(codes.min()) >= -qmax


def test_ternary_code_signs_follow_the_weight():
    torch.manual_seed(2)
    w = torch.randn(32, 32)
    for fmt in TERNARY_SCHEMES:
        quantizer = WEIGHT_FORMATS[fmt]()
        quantizer.init_from(w)
        codes = quantizer.quantize(w).codes
        nz = codes != 0
        assert torch.equal(codes[nz].sign(), w[nz].sign().to(torch.int8)), fmt


# --- gradients ---------------------------------------------------------------------------------

UPSTREAM = [[1.0, -2.0, 3.0, 0.5],
            [-1.5, 4.0, 2.0, -3.0]]


@pytest.mark.parametrize("fmt", ["absmean", "absmean_channel", "twn", "trilm", "trilm_mp2",
                                 "int8", "int4", "int2"])
def test_ste_weight_gradient_is_the_upstream_gradient(fmt):
    w = t(W_EVEN).requires_grad_()
    quantizer = WEIGHT_FORMATS[fmt]()
    quantizer.init_from(w.detach())
    (quantizer(w) * t(UPSTREAM)).sum().backward()
    close(w.grad, UPSTREAM, tol=0)


def test_learned_gradients_match_lsq_formulas():
    quantizer = Learned()
    with torch.no_grad():
        quantizer.scale.fill_(0.4 - EPS)  # alpha = |scale| + EPS = 0.4
    w = t(W_EVEN).requires_grad_()
    (quantizer(w) * t(UPSTREAM)).sum().backward()
    # W / alpha = [1.25, -0.25, 0, 2.75], [-1.5, 0.25, 0.75, -2.25]
    inside = t([[0, 1, 1, 0], [0, 1, 1, 0]])
    # s = round(W/a) - W/a inside [-1, 1], clamp(W/a, -1, 1) outside:
    s = t([[1.0, 0 - (-0.25), 0 - 0, 1.0],
           [-1.0, 0 - 0.25, 1 - 0.75, -1.0]])
    g = 1 / math.sqrt(8)
    expected_dalpha = g * float((t(UPSTREAM) * s).sum())
    # sum(G * s) = 1 + (-2)(0.25) + 0 + 0.5 + 1.5 + 4(-0.25) + 2(0.25) + 3 = 5.0
    assert float((t(UPSTREAM) * s).sum()) == pytest.approx(5.0)
    assert float(quantizer.scale.grad.sum()) == pytest.approx(expected_dalpha, rel=1e-4)
    close(w.grad, t(UPSTREAM) * inside, tol=0)


def test_learned_scale_gradient_scale_uses_numel():
    # Same weight tiled 4x: sum(G * s) is 4x larger, g is 1/sqrt(32) instead of 1/sqrt(8),
    # so dalpha grows by 4 / 2 = 2.
    grads = []
    for reps in (1, 4):
        quantizer = Learned()
        with torch.no_grad():
            quantizer.scale.fill_(0.4 - EPS)
        w = t(W_EVEN).repeat(reps, 1)
        (quantizer(w) * t(UPSTREAM).repeat(reps, 1)).sum().backward()
        grads.append(float(quantizer.scale.grad.sum()))
    assert grads[1] == pytest.approx(2 * grads[0], rel=1e-5)


@pytest.mark.parametrize("batch", [(5,), (3, 5)])  # a matrix, and a batch of sequences
def test_quant_linear_gradients_are_those_of_a_linear_with_the_dequantized_weight(batch):
    torch.manual_seed(3)
    linear = nn.Linear(16, 8, bias=False)
    x = torch.randn(*batch, 16, requires_grad=True)
    q = QuantLinear.from_linear(linear, AbsMean(), activation_bits=None)
    assert q.weight is linear.weight
    upstream = torch.randn(*batch, 8)
    (q(x) * upstream).sum().backward()

    codes_scale = AbsMean().quantize(linear.weight)
    w_hat = (codes_scale.codes.float() * codes_scale.scale).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (F.linear(x2, w_hat) * upstream).sum().backward()
    close(linear.weight.grad, w_hat.grad, tol=1e-6)  # STE: dW = dW_hat = upstream^T x
    close(x.grad, x2.grad, tol=1e-6)


# --- activations -------------------------------------------------------------------------------

def test_activation_quant_hand_example():
    x = t([[0.3, -1.0, 0.25, 0.1],
           [2.0, -0.3, 0.0, 0.9]])
    # row 0: absmax 1, scale 1/127: 38.1, -127, 31.75, 12.7 -> 38, -127, 32, 13
    # row 1: absmax 2, scale 2/127: 127, -19.05, 0, 57.15 -> 127, -19, 0, 57
    expected = t([[38 / 127, -1.0, 32 / 127, 13 / 127],
                  [2.0, -19 * 2 / 127, 0.0, 57 * 2 / 127]])
    close(quantize_activations(x, 8), expected, tol=1e-6)
    # 4 bits: qmax 7; row 0: 2.1, -7, 1.75, 0.7 -> 2, -7, 2, 1
    #                 row 1: 7, -1.05, 0, 3.15 -> 7, -1, 0, 3
    expected4 = t([[2 / 7, -1.0, 2 / 7, 1 / 7],
                   [2.0, -2 / 7, 0.0, 6 / 7]])
    close(quantize_activations(x, 4), expected4, tol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_quant_values_lie_on_the_per_token_grid(bits):
    torch.manual_seed(4)
    x = torch.randn(3, 5, 32) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    y = quantize_activations(x, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax  # one scale per token
    k = y / scale
    close(k, k.round(), tol=1e-3)
    assert float(k.abs().max()) <= qmax + 1e-3
    close(y.abs().amax(dim=-1), x.abs().amax(dim=-1), tol=1e-5)  # the absmax is exact
    # the rounding error is at most half a step
    assert bool(((y - x).abs() <= scale / 2 + 1e-6 * scale).all())


def test_activation_quant_is_straight_through():
    torch.manual_seed(5)
    x = torch.randn(4, 7, 16, requires_grad=True)
    upstream = torch.randn(4, 7, 16)
    (quantize_activations(x, 8) * upstream).sum().backward()
    close(x.grad, upstream, tol=0)


@pytest.mark.skipif(not cpu.supports(cpu.TERNARY),
                    reason="the C kernels need a compiler and an AVX2 CPU")
@pytest.mark.parametrize("magnitude", [1e-7, 1e-2, 1.0, 300.0])
def test_c_fake_quantization_is_torchs_bit_for_bit(magnitude):
    """Training runs the one-pass C kernels on CPU and torch's operations elsewhere (GPU): the
    two must give the same bits, ties and tiny rows (the 1e-5 floor) included."""
    torch.manual_seed(8)
    x = torch.randn(5, 7, 43) * magnitude  # 43 columns: the vector loop and its scalar tail
    # Row 0: exact ties x / scale = k + 0.5 (scale = absmax / 127), picked where multiplying by
    # 1 / scale would land beside the tie: a kernel that did so would round them differently.
    absmax = torch.tensor(3.0 * magnitude)
    step, k = absmax / 127, torch.arange(42.0) + 0.5
    ties = k * step
    assert int(((ties / step == k) & (ties * (1 / step) != ties / step)).sum()) >= 3
    x[0, 0] = torch.cat([ties, absmax.view(1)])
    codes, scale = activation_codes(x, 8)
    assert torch.equal(cpu.fake_quantize_activations(x, 8), codes * scale)
    codes4, scale4 = activation_codes(x, 4)
    assert torch.equal(fake_quantized_activations(x, 4), codes4 * scale4)
    w = x.reshape(35, 43)
    gamma = cpu.abs_mean(w)  # summed in double: torch's float mean may differ by an ulp
    assert torch.allclose(gamma, w.abs().mean(), rtol=1e-6, atol=0)
    torch_w_hat = (w / (gamma + EPS)).round().clamp(-1, 1) * gamma
    assert torch.equal(AbsMean().dequantized(w), torch_w_hat)
    q = AbsMean().quantize(w)
    assert torch.equal(AbsMean().dequantized(w), q.codes.float() * q.scale)


@pytest.mark.skipif(not cpu.supports(cpu.TERNARY),
                    reason="the C kernels need a compiler and an AVX2 CPU")
def test_c_fake_quantization_propagates_nan_as_torch_does():
    x = torch.randn(3, 20)
    x[1, 4] = float("nan")
    x[2, 17] = float("inf")
    codes, scale = activation_codes(x, 8)
    expected, got = codes * scale, cpu.fake_quantize_activations(x, 8)
    assert torch.equal(expected.isnan(), got.isnan()) and bool(got[1].isnan().all())
    assert torch.equal(expected.nan_to_num(), got.nan_to_num())


def test_quant_linear_quantizes_its_input():
    torch.manual_seed(6)
    linear = nn.Linear(16, 8, bias=True)
    q = QuantLinear.from_linear(linear, Int8(), activation_bits=8)
    assert q.bias is linear.bias and q.activation_bits == 8 and q.format == "int8"
    x = torch.randn(2, 3, 16)
    w = Int8().quantize(linear.weight)
    expected = F.linear(quantize_activations(x, 8), w.codes.float() * w.scale, linear.bias)
    close(q(x), expected, tol=1e-5)
    # without activation quantization the result differs
    q.activation_bits = None
    assert not torch.allclose(q(x), expected, atol=1e-6)


def test_quant_embedding_is_per_row():
    torch.manual_seed(7)
    emb = nn.Embedding(10, 6)
    with torch.no_grad():
        emb.weight[3] *= 100  # one large row must not coarsen the others
    q = QuantEmbedding.from_embedding(emb, Int4())
    assert q.weight is emb.weight and q.format == "int4"
    idx = torch.tensor([[0, 3, 9]])
    out = q(idx)
    for j, row in enumerate((0, 3, 9)):
        w = emb.weight[row].detach()
        scale = w.abs().max() / 7
        close(out[0, j], torch.round(w / scale) * scale, tol=1e-5)


def test_learned_from_linear_initialises_from_the_weight():
    torch.manual_seed(8)
    linear = nn.Linear(12, 6, bias=False)
    q = QuantLinear.from_linear(linear, Learned(), activation_bits=None)
    gamma = float(linear.weight.detach().abs().sum() / linear.weight.numel())
    assert float(q.weight_quantizer.scale.detach()) == pytest.approx(gamma, rel=1e-6)
    assert float(q.weight_quantizer.initial_scale) == pytest.approx(gamma, rel=1e-6)
    assert set(dict(q.named_parameters())) == {"weight", "weight_quantizer.scale"}
