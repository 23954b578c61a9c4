"""The decoder-only transformer every study trains, and its size ladder.

Pre-norm blocks of RMSNorm -> causal self-attention with RoPE -> RMSNorm -> gated MLP, no
biases. `ModelConfig.block` picks the block variant (`BLOCKS`):
  llama   SwiGLU MLP (Llama; the paper's architecture)
  bitnet  BitNet b1.58 2B4T (arXiv 2504.12285; transformers' models/bitnet): a sub-layer RMSNorm
          before the attention output projection and before the MLP down projection
          (`attn_sub_norm`, `ffn_sub_norm` there) and a squared-ReLU gated MLP, relu(gate)^2 * up
Precision is not this module's business: `plans.apply_plan` swaps its linears after
construction. Shapes: B batch, T time, C width, H heads, D = C // H head size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternarylm.errors import UserError


class ModelConfigError(UserError):
    """A model configuration that cannot be built; the message says what to change."""


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU^2 (So et al. 2021, Primer), BitNet b1.58 2B4T's MLP activation ("relu2")."""
    return F.relu(x).square()


@dataclass(frozen=True)
class BlockSpec:
    """What sets a block variant apart."""

    activation: Callable[[torch.Tensor], torch.Tensor]
    """Gate activation of the gated MLP: down(activation(gate(x)) * up(x))."""
    sub_norms: bool
    """An RMSNorm on the attention output before `o` and on the MLP hidden state before `down`."""


BLOCKS: dict[str, BlockSpec] = {
    "llama": BlockSpec(F.silu, sub_norms=False),
    "bitnet": BlockSpec(relu_squared, sub_norms=True),
}


@dataclass
class ModelConfig:
    width: int = 768
    """Residual stream width C."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Attention heads; must divide width."""
    vocab_size: int = 30522
    """Vocabulary size V (30,522 is BERT's, as in the paper)."""
    seq_len: int = 256
    """Longest context the model is trained on (RoPE tables are built for it)."""
    mlp_ratio: float = 2.67
    """SwiGLU hidden size = int(mlp_ratio * width), as in the paper."""
    tie_head: bool = False
    """Share the output head with the token embedding."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    block: str = "llama"
    """Block variant: `llama` (SwiGLU) or `bitnet` (BitNet b1.58's sub-norms and ReLU^2 GLU)."""

    def __post_init__(self) -> None:
        for name in ("width", "n_layers", "n_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model: {name} must be a positive integer, "
                                       f"got {getattr(self, name)!r}")
        if self.width % self.n_heads:
            raise ModelConfigError(f"model: width {self.width} is not divisible by n_heads "
                                   f"{self.n_heads}; pick n_heads dividing the width")
        if (self.width // self.n_heads) % 2:
            raise ModelConfigError(f"model: head size {self.width // self.n_heads} must be even "
                                   f"for RoPE; change width or n_heads")
        if not 0 <= self.dropout < 1:
            raise ModelConfigError(f"model: dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ModelConfigError(f"model: mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.block not in BLOCKS:
            raise ModelConfigError(f"model: unknown block {self.block!r}; choose one of "
                                   f"{', '.join(BLOCKS)}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.width)

    def linear_names(self) -> list[str]:
        """Qualified names of the model's nn.Linear modules, without building it (a precision
        plan is resolved against them when a config is validated)."""
        return [f"blocks.{i}.{part}" for i in range(self.n_layers)
                for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up",
                             "mlp.down")] + ["head"]

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts, without building the model."""
        c, h = self.width, self.mlp_hidden
        block_linear = 4 * c * c + 3 * c * h
        embedding = self.vocab_size * c
        head = 0 if self.tie_head else self.vocab_size * c
        sub_norms = c + h if BLOCKS[self.block].sub_norms else 0
        norms = self.n_layers * (2 * c + sub_norms) + c
        return {
            "params_total": embedding + head + self.n_layers * block_linear + norms,
            "params_embedding": embedding,
            "params_head": head,
            # Kaplan et al.'s N: the blocks, without the vocabulary matrices (embedding, head).
            "params_non_embedding": self.n_layers * block_linear + norms,
            "params_block_linear": self.n_layers * block_linear,
        }

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x matmul params (blocks and head) + attention scores.

        Attention adds 2 matmuls (QK^T and AV) of 2 * T * C FLOPs each per token and layer in the
        forward pass, times 3 for forward + backward (Kaplan et al. 2020; PaLM appendix B).
        """
        t = seq_len or self.seq_len
        matmul_params = self.n_layers * (4 * self.width ** 2 + 3 * self.width * self.mlp_hidden)
        matmul_params += self.vocab_size * self.width  # the head is a matmul even when tied
        return 6 * matmul_params + 12 * self.n_layers * t * self.width


# Spectra's shapes (Kaushal et al., arXiv 2407.12327; the SpectraSuite README's table: hidden,
# GLU, heads, layers) for the sizes a laptop can train (their MP degree is 1: one TriLM shard).
# Their parameter names count a 50k vocabulary; ours depend on the tokenizer.
_SPECTRA_MLP = {512: 1280 / 512, 768: 2048 / 768, 1024: 2560 / 1024, 1280: 3072 / 1280}

SIZES: dict[str, ModelConfig] = {
    name: ModelConfig(width=w, n_layers=l, n_heads=h, mlp_ratio=ratio)
    for name, (w, l, h, ratio) in {
        "pico": (32, 4, 4, 2.67),             # 0.05M non-embedding block params
        "nano": (48, 4, 4, 2.67),             # 0.11M
        "tiny": (64, 4, 4, 2.67),             # 0.2M
        "deep-nano": (64, 12, 4, 2.67),       # 0.59M: tiny's width at the paper's 12 blocks
        "micro": (128, 4, 4, 2.67),           # 0.8M
        "mini": (192, 4, 4, 2.67),            # 1.8M
        "small": (384, 6, 6, 2.67),           # 10.6M
        "medium": (512, 8, 8, 2.67),          # 25M
        "spectra-99m": (512, 16, 8, _SPECTRA_MLP[512]),     # 48M
        "paper-132m": (768, 12, 12, 2.67),    # 85M block params, 131.9M total with V = 30,522
        "spectra-190m": (768, 16, 12, _SPECTRA_MLP[768]),   # 113M
        "spectra-390m": (1024, 24, 16, _SPECTRA_MLP[1024]),  # 290M
        "large": (1024, 24, 16, 2.67),        # 302M
        "spectra-560m": (1280, 24, 20, _SPECTRA_MLP[1280]),  # 440M
        "xl": (1536, 24, 16, 2.67),           # 680M
        "xxl": (2048, 24, 32, 2.67),          # 1.21B
    }.items()
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The preset `size` with some fields replaced (vocab_size, seq_len, dropout, ...)."""
    if size not in SIZES:
        raise ModelConfigError(f"unknown model size {size!r}; sizes: {', '.join(SIZES)}")
    return dataclasses.replace(SIZES[size], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, D/2] for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x [B, H, T, D] by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k = nn.Linear(cfg.width, cfg.width, bias=False)
        self.v = nn.Linear(cfg.width, cfg.width, bias=False)
        self.o = nn.Linear(cfg.width, cfg.width, bias=False)
        self.sub_norm = RMSNorm(cfg.width) if BLOCKS[cfg.block].sub_norms else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y if self.sub_norm is None else self.sub_norm(y))


class GatedMLP(nn.Module):
    """down(activation(gate(x)) * up(x)): SwiGLU (llama) or ReLU^2 GLU with a sub-norm (bitnet)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = BLOCKS[cfg.block]
        self.activation = spec.activation
        self.gate = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)
        self.sub_norm = RMSNorm(cfg.mlp_hidden) if spec.sub_norms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.gate(x)) * self.up(x)
        return self.down(h if self.sub_norm is None else self.sub_norm(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.width), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.width), GatedMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class TernaryLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.width // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_head:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, V]."""
        return self.head(self.hidden_states(idx))

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> final normed hidden states [B, T, C] (before the head)."""
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len "
                             f"{self.cfg.seq_len}")
        x = self.drop(self.embed(idx))  # [B, T, C]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               label_smoothing=label_smoothing)
