"""The model: configuration checks, exact parameter and FLOP counts, `ternarylm describe`, and a
tiny model per ternary scheme (plus the FP control) that actually learns from real text."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from ternarylm.model.transformer import (
    SIZES,
    ModelConfig,
    ModelConfigError,
    TernaryLM,
    model_config,
)
from ternarylm.model.plans import PrecisionPlan, apply_plan, preset
from ternarylm.model.quantizers import TERNARY_SCHEMES

SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_sample.txt"


def hand_counts(c: int, n_layers: int, vocab: int, hidden: int, tied: bool,
                block: str = "llama") -> int:
    """Parameters of the architecture, counted layer by layer."""
    attention = 4 * c * c  # q, k, v, o without biases
    mlp = 3 * c * hidden  # gate, up [c -> hidden], down [hidden -> c]
    norms = 2 * c  # two RMSNorm gains per block
    if block == "bitnet":
        norms += c + hidden  # sub-norms before o (width c) and before down (width hidden)
    embedding = vocab * c
    head = 0 if tied else vocab * c
    return embedding + n_layers * (attention + mlp + norms) + c + head  # + the final norm


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"width": 100, "n_heads": 3}, "width 100 is not divisible by n_heads 3"),
    ({"width": 96, "n_heads": 32}, "head size 3 must be even for RoPE"),
    ({"width": 0}, "width must be a positive integer, got 0"),
    ({"n_layers": -2}, "n_layers must be a positive integer, got -2"),
    ({"n_heads": 2.0}, "n_heads must be a positive integer, got 2.0"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"seq_len": None}, "seq_len must be a positive integer, got None"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, "dropout must be in"),
    ({"mlp_ratio": 0}, "mlp_ratio must be positive, got 0"),
])
def test_config_errors(fields, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(**fields)


def test_unknown_size_and_overrides():
    with pytest.raises(ModelConfigError, match=r"unknown model size 'huge'; sizes: .*\btiny\b"):
        model_config("huge")
    cfg = model_config("small", vocab_size=8192, seq_len=128)
    assert (cfg.width, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.seq_len) == (
        384, 6, 6, 8192, 128)
    assert SIZES["small"].vocab_size == 30522  # the ladder entry itself is unchanged
    with pytest.raises(ModelConfigError, match="not divisible"):
        model_config("tiny", n_heads=5)


def test_ladder_is_valid_and_grows():
    non_embedding = [cfg.param_counts()["params_non_embedding"] for cfg in SIZES.values()]
    assert non_embedding == sorted(non_embedding) and len(set(non_embedding)) == len(SIZES)
    for cfg in SIZES.values():
        assert cfg.width % cfg.n_heads == 0 and (cfg.width // cfg.n_heads) % 2 == 0


def test_sequence_longer_than_seq_len():
    model = TernaryLM(ModelConfig(width=16, n_layers=1, n_heads=2, vocab_size=16, seq_len=8))
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than the model's "
                                         "seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- counts ------------------------------------------------------------------------------------

def test_paper_132m_counts():
    cfg = model_config("paper-132m")
    assert (cfg.width, cfg.n_layers, cfg.n_heads, cfg.vocab_size) == (768, 12, 12, 30522)
    # SwiGLU hidden: int(2.67 * 768) = int(2050.56) = 2050
    assert cfg.mlp_hidden == 2050
    counts = cfg.param_counts()
    assert abs(counts["params_total"] - 131.8e6) <= 0.005 * 131.8e6
    # 12 * (4 * 768^2 + 3 * 768 * 2050 + 2 * 768) + 2 * 30522 * 768 + 768
    assert counts["params_total"] == 12 * (2_359_296 + 4_723_200 + 1_536) + 46_881_792 + 768
    assert counts["params_total"] == hand_counts(768, 12, 30522, 2050, tied=False)
    assert counts["params_embedding"] == counts["params_head"] == 30522 * 768
    assert counts["params_non_embedding"] == (counts["params_total"]
                                              - 2 * counts["params_embedding"])
    assert counts["params_block_linear"] == 12 * (4 * 768 ** 2 + 3 * 768 * 2050)


@pytest.mark.parametrize("size, tied, block", [("tiny", False, "llama"), ("tiny", True, "llama"),
                                               ("micro", False, "llama"),
                                               ("tiny", False, "bitnet"),
                                               ("tiny", True, "bitnet")])
def test_param_counts_match_a_built_model(size, tied, block):
    cfg = model_config(size, vocab_size=300, seq_len=32, tie_head=tied, block=block)
    model = TernaryLM(cfg)
    counts = cfg.param_counts()
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied head once
    assert counts["params_total"] == total
    assert counts["params_total"] == hand_counts(cfg.width, cfg.n_layers, 300, cfg.mlp_hidden,
                                                 tied, block)
    assert counts["params_embedding"] == model.embed.weight.numel()
    assert counts["params_head"] == (0 if tied else model.head.weight.numel())
    block_linear = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n.startswith("blocks."))
    assert counts["params_block_linear"] == block_linear
    assert counts["params_non_embedding"] == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("embed.", "head.")))

    # converted (blocks 1-2 ternary, 0 and 3 int8): the same parameters, plus one learned scale
    # per ternary linear (learned) or one per output row (paretoq)
    for scheme in TERNARY_SCHEMES:
        converted = TernaryLM(cfg)
        formats = apply_plan(converted, PrecisionPlan(first_k=1, last_k=1), scheme, cfg.n_layers)
        ternary = [converted.get_submodule(n) for n, f in formats.items() if f == scheme]
        assert len(ternary) == 2 * 7
        extra = {"learned": len(ternary),
                 "paretoq": sum(m.out_features for m in ternary)}.get(scheme, 0)
        scales = sum(p.numel() for n, p in converted.named_parameters()
                     if "weight_quantizer" in n)
        assert scales == extra, scheme
        assert sum(p.numel() for p in converted.parameters()) - extra == total


def test_flops_per_token():
    cfg = model_config("micro", vocab_size=500, seq_len=64)
    model = TernaryLM(cfg)
    # 6 FLOPs per matmul weight per token (2 forward + 4 backward), counted from the built model
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # attention scores: QK^T and AV are 2 * T * C FLOPs each per token and layer, x3 for backward
    attention = 3 * 2 * (2 * 64 * cfg.width) * cfg.n_layers
    assert cfg.flops_per_token() == 6 * matmul + attention
    assert cfg.flops_per_token(seq_len=128) - cfg.flops_per_token() == attention
    # a tied head is still a matmul
    tied = model_config("micro", vocab_size=500, seq_len=64, tie_head=True)
    assert tied.flops_per_token() == cfg.flops_per_token()
    # paper-132m at T = 256: 6 * (84,989,952 + 23,440,896) + 12 * 12 * 256 * 768
    assert model_config("paper-132m").flops_per_token() == 6 * 108_430_848 + 28_311_552


def _ternarylm_command() -> list[str]:
    script = Path(sys.executable).with_name("ternarylm")
    if script.exists():
        return [str(script)]
    found = shutil.which("ternarylm")
    return [found] if found else [sys.executable, "-m", "ternarylm.cli"]


def test_describe_cli_json():
    proc = subprocess.run([*_ternarylm_command(), "describe", "--size", "paper-132m", "--plan",
                           "all_ternary", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert isinstance(info, dict)
    for key in ("params_total", "params_non_embedding", "ternary_weights", "flops_per_token",
                "fp32_bytes", "packed_bytes"):
        assert isinstance(info[key], int), key
    block_linear = 12 * (4 * 768 ** 2 + 3 * 768 * 2050)
    vocab = 30522 * 768
    assert info["params_total"] == hand_counts(768, 12, 30522, 2050, tied=False)
    assert info["params_non_embedding"] == block_linear + 25 * 768
    assert info["ternary_weights"] == block_linear  # every block linear; the head stays fp
    assert info["flops_per_token"] == 6 * (block_linear + vocab) + 12 * 12 * 256 * 768
    assert info["fp32_bytes"] == 4 * info["params_total"]
    # packed_bytes is checked against a real packed file in tests/test_results_layer.py


def test_describe_cli_error_is_one_line(capsys):
    from ternarylm.cli import main

    assert main(["describe", "--size", "tiny", "--seq-len", "-3"]) == 2
    assert capsys.readouterr().err.strip() == ("ternarylm describe: error: model: seq_len must "
                                               "be a positive integer, got -3")


# --- behaviour ---------------------------------------------------------------------------------

def test_forward_is_causal():
    torch.manual_seed(0)
    model = TernaryLM(ModelConfig(width=32, n_layers=2, n_heads=4, vocab_size=50, seq_len=16))
    apply_plan(model, preset("all_ternary"), "absmean", 2)
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 50)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10], b[:, 10])


# --- training ----------------------------------------------------------------------------------

SEQ, BATCH, STEPS = 64, 16, 200


@pytest.fixture(scope="module")
def text() -> np.ndarray:
    if not TINYSTORIES.exists():
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES} (set TERNARYLM_SHARED_DATA)")
    return np.frombuffer(TINYSTORIES.read_bytes(), dtype=np.uint8)  # bytes are the tokens


def bigram_entropy_nats(data: np.ndarray) -> float:
    """H(next byte | previous byte) of the text: the best loss of a model that sees one byte."""
    pairs = np.bincount(data[:-1].astype(np.int64) * 256 + data[1:], minlength=256 * 256)
    joint = pairs.reshape(256, 256) / pairs.sum()
    given = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)
    seen = joint > 0
    return float(-(joint[seen] * np.log(given[seen])).sum())


# trilm_mp2/3/6 differ from trilm only in how many rows share a scale (hand-tested in
# test_quantizers); training each of them again would only add minutes.
@pytest.mark.parametrize("scheme, plan", [(s, "all_ternary") for s in TERNARY_SCHEMES
                                          if not s.startswith("trilm_mp")]
                         + [("absmean", "fp")])
@pytest.mark.slow
def test_tiny_model_learns(text, one_torch_thread, scheme, plan):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = model_config("tiny", vocab_size=256, seq_len=SEQ)
    model = TernaryLM(cfg)
    formats = apply_plan(model, preset(plan), scheme, cfg.n_layers)
    assert set(formats.values()) == ({scheme, "fp"} if plan == "all_ternary" else {"fp"})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    block_linears = {n: model.get_submodule(n) for n in formats if n.startswith("blocks.")}
    initial = {n: (m.weight_quantizer.quantize(m.weight).codes if formats[n] != "fp"
                   else m.weight.detach().clone()) for n, m in block_linears.items()}
    losses = []
    start = time.perf_counter()
    for _ in range(STEPS):
        starts = rng.integers(0, len(text) - SEQ - 1, BATCH)
        batch = torch.from_numpy(np.stack([text[i:i + SEQ + 1] for i in starts]).astype(np.int64))
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    assert all(math.isfinite(x) for x in losses), f"non-finite loss in {losses}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = losses[0], np.mean(losses[-20:])
    # starts at a uniform guess over 256 bytes (the init's logits are all near 0) ...
    assert abs(first - math.log(256)) < 0.2
    # ... and ends below what the previous byte alone can give (H(next | previous), computed
    # from the text): the blocks learned to use context. Embedding and head alone cannot.
    assert last < bigram_entropy_nats(text), (first, last)
    print(f"{scheme}/{plan}: loss {first:.3f} -> {last:.3f} in {seconds:.1f}s")

    for name, module in block_linears.items():
        if formats[name] == "fp":
            assert not torch.equal(module.weight, initial[name]), f"{name} did not train"
            continue
        codes = module.weight_quantizer.quantize(module.weight).codes
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        # gradients reached the latent weights through the STE: codes flipped
        flipped = float((codes != initial[name]).float().mean())
        assert flipped > 0.01, f"{name}: only {flipped:.2%} of its codes changed"
        if scheme in ("learned", "paretoq"):  # trainable scales: they moved
            q = module.weight_quantizer
            moved = float((q.quantize(module.weight).scale - q.initial_scale).abs().max())
            assert moved > 1e-3 * float(q.initial_scale.abs().max()), f"{name}: scale unchanged"
