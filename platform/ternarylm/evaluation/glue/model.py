"""GLUE classifier: the pretrained LM, precision plan and all, with a new full-precision head.

The head reads the pooled final hidden states: the mean over the real tokens, or the last real
token; padding is ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternarylm.evaluation.glue.data import N_CLASSES, GlueError

POOLINGS = ("mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, C] -> [B, C]: mean over real tokens, or the last real token (right padding)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise GlueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class GlueClassifier(nn.Module):
    """The pretrained LM (precision plan and all) with a full-precision linear classifier on its
    pooled final hidden states. The LM's own output head is not used."""

    def __init__(self, lm: nn.Module, n_classes: int = N_CLASSES, pooling: str = "mean",
                 dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise GlueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.lm, self.pooling = lm, pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(lm.cfg.width, n_classes)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and real-token mask [B, T] -> class logits [B, n_classes]."""
        pooled = pool(self.lm.hidden_states(idx), mask, self.pooling)
        return self.classifier(self.dropout(pooled.float()))
