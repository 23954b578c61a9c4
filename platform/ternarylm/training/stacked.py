"""A cohort's models in one module: M members of one shape, their weights stacked on a leading
axis, trained by one batched forward and backward.

`StackedLM` is the members' `TernaryLM` itself (its forward, blocks and attention code run
unchanged) with every linear, embedding and norm swapped for a stacked one that holds the M
members' weights as one tensor [M, ...]. The members travel folded into the batch: token ids
[M, B, T] become [M * B, T], attention sees M * B sequences, and each stacked layer unfolds
[M * B, T, C] into [M, B * T, C] to apply member m's weights to member m's rows (one
`torch.bmm` per linear).

Quantization stays per member: a stacked layer keeps each member's own weight quantizer (the
module `plans.apply_plan` made for that member, with its learned scales), applies it to the
member's slice of the stacked weight, and stacks the results, so the forward value and the
straight-through gradients are the quantizer classes' own. The quantizers run once per member
(a loop over M small tensors); the matrix products are batched.

A member starts from exactly the weights it would have trained alone (`train.build_model`:
seeded, then its plan applied), and `member_model(m)` unstacks member m back into a plain
TernaryLM under its plan, so saving, packing and analysis run on it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternarylm.config import TrialConfig
from ternarylm.data import WindowSampler
from ternarylm.model.transformer import RMSNorm, TernaryLM
from ternarylm.model.quantizers import QuantEmbedding, QuantLinear, quantize_activations
from ternarylm.training.train import build_model

_LINEARS = (nn.Linear, QuantLinear)
_EMBEDDINGS = (nn.Embedding, QuantEmbedding)


def _quantizers(layers: list[nn.Module]) -> nn.ModuleList:
    """Each member's weight quantizer; nn.Identity where the member keeps the layer in fp."""
    return nn.ModuleList(layer.weight_quantizer if hasattr(layer, "weight_quantizer")
                         else nn.Identity() for layer in layers)


class _Stacked(nn.Module):
    """What the stacked layers share: weight [M, ...] and one quantizer per member."""

    weight: nn.Parameter
    quantizers: nn.ModuleList

    def _init(self, layers: list[nn.Module]) -> None:
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.quantizers = _quantizers(layers)

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def member_weights(self) -> torch.Tensor:
        """The weights the forward uses, [M, ...]: member m's slice through its quantizer."""
        return torch.stack([q(self.weight[m]) for m, q in enumerate(self.quantizers)])

    def member_state(self, m: int, prefix: str) -> dict[str, torch.Tensor]:
        """Member m's entries of this layer, named as in its own TernaryLM's state dict."""
        state = {f"{prefix}weight": self.weight[m]}
        if not isinstance(self.quantizers[m], nn.Identity):
            state |= self.quantizers[m].state_dict(prefix=f"{prefix}weight_quantizer.")
        return state


class StackedLinear(_Stacked):
    """The members' versions of one linear (no bias, as every linear of the model)."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self._init(layers)
        self.activation_bits = [getattr(layer, "activation_bits", None) for layer in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M * B, T, in] -> [M * B, T, out]."""
        xs = x.reshape(self.members, -1, x.shape[-1])
        if any(self.activation_bits):
            xs = torch.stack([xs[m] if bits is None else quantize_activations(xs[m], bits)
                              for m, bits in enumerate(self.activation_bits)])
        y = torch.bmm(xs, self.member_weights().transpose(1, 2))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class StackedEmbedding(_Stacked):
    def __init__(self, layers: list[nn.Embedding]) -> None:
        super().__init__()
        self._init(layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [M * B, T] -> [M * B, T, C]: member m's rows look up member m's table (one
        gather over the tables laid end to end)."""
        tables = self.member_weights()  # [M, V, C]
        vocab = tables.shape[1]
        offsets = torch.arange(self.members, device=idx.device) * vocab
        shifted = idx.view(self.members, -1) + offsets[:, None]
        return F.embedding(shifted.view_as(idx), tables.flatten(0, 1))


class StackedRMSNorm(nn.Module):
    def __init__(self, norms: list[RMSNorm]) -> None:
        super().__init__()
        self.eps = norms[0].eps
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(self.weight.shape[0], -1, x.shape[-1])
        y = F.rms_norm(xs, (x.shape[-1],), eps=self.eps) * self.weight[:, None, :]
        return y.view_as(x)

    def member_state(self, m: int, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}weight": self.weight[m]}


def _stack(layers: list[nn.Module]) -> nn.Module:
    if isinstance(layers[0], _LINEARS):
        return StackedLinear(layers)
    if isinstance(layers[0], _EMBEDDINGS):
        return StackedEmbedding(layers)
    return StackedRMSNorm(layers)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class StackedLM(nn.Module):
    """The cohort's members in one module: forward [M, B, T] token ids -> [M, B, T, V]."""

    def __init__(self, trials: list[TrialConfig], vocab_size: int) -> None:
        super().__init__()
        built = [build_model(t, vocab_size) for t in trials]
        self.trials, self.vocab_size = trials, vocab_size
        self.formats = [formats for _, formats in built]
        models = [model for model, _ in built]
        # Member 0's model is the skeleton: its modules are replaced, its code is kept.
        self.model = models[0]
        self.cfg = self.model.cfg
        self.stacked_names = [name for name, module in self.model.named_modules()
                              if isinstance(module, (*_LINEARS, *_EMBEDDINGS, RMSNorm))]
        layers = {name: [m.get_submodule(name) for m in models] for name in self.stacked_names}
        for name in self.stacked_names:
            _set_submodule(self.model, name, _stack(layers[name]))
        if self.cfg.tie_head:  # one stacked table, as each member has one
            self.model.head.weight = self.model.embed.weight

    @property
    def members(self) -> int:
        return len(self.trials)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        M, B, T = idx.shape
        return self.model(idx.reshape(M * B, T)).view(M, B, T, -1)

    def member_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights, named and shaped as its own TernaryLM's state dict (detached
        views into the stacked tensors)."""
        state: dict[str, torch.Tensor] = {}
        for name in self.stacked_names:
            state |= self.model.get_submodule(name).member_state(m, f"{name}.")
        return {k: v.detach() for k, v in state.items()}

    @torch.no_grad()
    def member_model(self, m: int) -> TernaryLM:
        """Member m as the plain TernaryLM it would be had it trained alone (its plan applied,
        its weights copied), on the stacked model's device."""
        model, _ = build_model(self.trials[m], self.vocab_size)
        model.load_state_dict(self.member_state_dict(m), strict=True)
        return model.to(self.model.embed.weight.device)

    def member_parameters(self) -> list[tuple[str, nn.Parameter, int | None]]:
        """(name, parameter, member): member None for a stacked tensor (leading axis M), m for a
        parameter only member m has (a learned quantizer's scale)."""
        out = []
        for name, p in self.named_parameters():
            member = None
            if ".quantizers." in name:
                member = int(name.split(".quantizers.")[1].split(".")[0])
            out.append((name, p, member))
        return out


def member_batches(samplers: list[WindowSampler], step: int,
                   micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's own training batch (its sampler, its seed) stacked: x, y [M, B, T]."""
    xs, ys = zip(*(s.batch(step, micro) for s in samplers))
    return torch.stack(xs), torch.stack(ys)


def member_losses(logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: list[float] | None = None) -> torch.Tensor:
    """Mean next-token loss of each member, [M], from logits [M, B, T, V] and targets
    [M, B, T]; `label_smoothing` per member (training), none for evaluation."""
    smoothing = label_smoothing or [0.0] * logits.shape[0]
    return torch.stack([
        F.cross_entropy(logits[m].flatten(0, 1).float(), targets[m].flatten(),
                        label_smoothing=s) for m, s in enumerate(smoothing)])
