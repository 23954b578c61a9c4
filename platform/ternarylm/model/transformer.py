"""The decoder-only transformer every study trains, and its size ladder.

Pre-norm blocks of RMSNorm -> causal self-attention with RoPE -> RMSNorm -> gated MLP, no
biases. `ModelConfig.block` picks the block variant (`BLOCKS`):
  llama   SwiGLU MLP (Llama; the paper's architecture)
  bitnet  BitNet b1.58 2B4T (arXiv 2504.12285; transformers' models/bitnet): a sub-layer RMSNorm
          before the attention output projection and before the MLP down projection
          (`attn_sub_norm`, `ffn_sub_norm` there) and a squared-ReLU gated MLP, relu(gate)^2 * up
`ModelConfig.layer_table` lists every weight (qualified name, role, block, shape, and its
Hugging Face and GGUF names) without building the model: plans, packing, the packed model and
the exporters read it, so a block variant is described here once. Precision is not this
module's business: `plans.apply_plan` swaps its linears after construction. Shapes: B batch, T time, C width, H heads, D = C // H head size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternarylm.core.errors import UserError


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
    gated: bool = True
    """A gate projection: down(activation(gate(x)) * up(x)); without it down(activation(up(x)))."""


BLOCKS: dict[str, BlockSpec] = {
    "llama": BlockSpec(F.silu, sub_norms=False),
    "bitnet": BlockSpec(relu_squared, sub_norms=True),
}


# ---------------------------------------------------------------------------------------------
# The layer table: every weight of the model, derived from its config, read by every backend
# (plans, packing and the packed model, Hugging Face and GGUF export, analysis, allocation).


@dataclass(frozen=True)
class Role:
    """What one kind of weight is, wherever it sits, and what other formats call it."""

    kind: str
    """linear, embedding or norm."""
    path: str
    """Module path inside a block (attn.q) or the model (embed)."""
    hf: str
    """Parameter name in transformers' LlamaForCausalLM / BitNetForCausalLM ({i}: block)."""
    gguf: str
    """Tensor name in llama.cpp (gguf's TENSOR_NAMES, plus .weight)."""
    fused: str | None = None
    """The one matmul of the packed model this linear joins (it reads the same input)."""


_LAYER = "model.layers.{i}."
ROLES: dict[str, Role] = {
    "embedding": Role("embedding", "embed", "model.embed_tokens.weight", "token_embd.weight"),
    "attn_norm": Role("norm", "attn_norm", _LAYER + "input_layernorm.weight",
                      "blk.{i}.attn_norm.weight"),
    "q": Role("linear", "attn.q", _LAYER + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
              "qkv"),
    "k": Role("linear", "attn.k", _LAYER + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
              "qkv"),
    "v": Role("linear", "attn.v", _LAYER + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
              "qkv"),
    "o": Role("linear", "attn.o", _LAYER + "self_attn.o_proj.weight",
              "blk.{i}.attn_output.weight"),
    "attn_sub_norm": Role("norm", "attn.sub_norm", _LAYER + "self_attn.attn_sub_norm.weight",
                          "blk.{i}.attn_sub_norm.weight"),
    "mlp_norm": Role("norm", "mlp_norm", _LAYER + "post_attention_layernorm.weight",
                     "blk.{i}.ffn_norm.weight"),
    "gate": Role("linear", "mlp.gate", _LAYER + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight",
                 "gate_up"),
    "up": Role("linear", "mlp.up", _LAYER + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight",
               "gate_up"),
    "down": Role("linear", "mlp.down", _LAYER + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    "mlp_sub_norm": Role("norm", "mlp.sub_norm", _LAYER + "mlp.ffn_sub_norm.weight",
                         "blk.{i}.ffn_sub_norm.weight"),
    "norm": Role("norm", "norm", "model.norm.weight", "output_norm.weight"),
    "head": Role("linear", "head", "lm_head.weight", "output.weight"),
}


RESIDUAL_ROLES = ("o", "down")  # the projections that write into the residual stream


@dataclass(frozen=True)
class LayerSpec:
    """One weight of the model: where it is, what it does, its shape and its names elsewhere."""

    name: str
    """Qualified module name in TernaryLM (blocks.3.attn.q); also the packed file's layer key."""
    role: str
    """Key of `ROLES`: q, k, v, o, gate, up, down, head, embedding or a norm."""
    block: int | None
    """Transformer block index; None outside the blocks (embedding, final norm, head)."""
    shape: tuple[int, ...]
    """The weight's shape: [out, in] for a linear, [vocab, width] for the embedding."""

    @property
    def kind(self) -> str:
        return ROLES[self.role].kind

    @property
    def sublayer(self) -> str | None:
        """attn or mlp for a layer of a block's attention or MLP (plans set them apart), else
        None (the block's pre-norms, and everything outside the blocks)."""
        return ROLES[self.role].path.split(".")[0] if "." in ROLES[self.role].path else None

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fused(self) -> str | None:
        return ROLES[self.role].fused

    @property
    def hf_name(self) -> str:
        return ROLES[self.role].hf.format(i=self.block)

    @property
    def gguf_name(self) -> str:
        return ROLES[self.role].gguf.format(i=self.block)


def block_roles(block: str) -> list[str]:
    """The roles of one block of a variant, in the order its modules are registered."""
    spec = BLOCKS[block]
    attn = ["attn_norm", "q", "k", "v", "o"] + (["attn_sub_norm"] if spec.sub_norms else [])
    mlp = ["mlp_norm"] + (["gate"] if spec.gated else []) + ["up", "down"]
    return attn + mlp + (["mlp_sub_norm"] if spec.sub_norms else [])


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

    def layer_table(self) -> list[LayerSpec]:
        """Every weight of the model, in TernaryLM's module order, without building it (a
        precision plan is resolved against it when a config is validated)."""
        c, h, v = self.width, self.mlp_hidden, self.vocab_size
        shapes = {"q": (c, c), "k": (c, c), "v": (c, c), "o": (c, c), "gate": (h, c),
                  "up": (h, c), "down": (c, h), "attn_sub_norm": (c,), "mlp_sub_norm": (h,),
                  "attn_norm": (c,), "mlp_norm": (c,)}
        table = [LayerSpec("embed", "embedding", None, (v, c))]
        for i in range(self.n_layers):
            table += [LayerSpec(f"blocks.{i}.{ROLES[r].path}", r, i, shapes[r])
                      for r in block_roles(self.block)]
        return table + [LayerSpec("norm", "norm", None, (c,)),
                        LayerSpec("head", "head", None, (v, c))]

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts, without building the model."""
        table = self.layer_table()
        blocks = sum(s.numel for s in table if s.block is not None)
        block_linear = sum(s.numel for s in table if s.block is not None and s.kind == "linear")
        embedding = sum(s.numel for s in table if s.role == "embedding")
        head = 0 if self.tie_head else sum(s.numel for s in table if s.role == "head")
        # Kaplan et al.'s N: the blocks and final norm, without the vocabulary matrices.
        non_embedding = blocks + sum(s.numel for s in table if s.role == "norm")
        return {
            "params_total": embedding + head + non_embedding,
            "params_embedding": embedding,
            "params_head": head,
            "params_non_embedding": non_embedding,
            "params_block_linear": block_linear,
        }

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x matmul params (blocks and head) + attention scores.

        Attention adds 2 matmuls (QK^T and AV) of 2 * T * C FLOPs each per token and layer in the
        forward pass, times 3 for forward + backward (Kaplan et al. 2020; PaLM appendix B).
        """
        t = seq_len or self.seq_len
        # The head is a matmul even when tied.
        matmul_params = sum(s.numel for s in self.layer_table() if s.kind == "linear")
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
    """down(activation(gate(x)) * up(x)): SwiGLU (llama) or ReLU^2 GLU with a sub-norm (bitnet);
    down(activation(up(x))) for a variant without a gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = BLOCKS[cfg.block]
        self.activation = spec.activation
        self.gate = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False) if spec.gated else None
        self.up = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)
        self.sub_norm = RMSNorm(cfg.mlp_hidden) if spec.sub_norms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.activation(self.up(x)) if self.gate is None
             else self.activation(self.gate(x)) * self.up(x))
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
        for layer in cfg.layer_table():
            if layer.role in RESIDUAL_ROLES:
                nn.init.normal_(self.get_submodule(layer.name).weight,
                                std=0.02 / math.sqrt(2 * cfg.n_layers))
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
