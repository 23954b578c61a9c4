"""Optimiser parameter groups and learning-rate / weight-decay schedules, for every training loop.

Schedules are functions of the 0-based optimizer step. `TrainSchedule` drives one AdamW from a
`TrainConfig`: its learning rate (`lr_factor`) and, for the two-stage schedule, its weight decay
(`weight_decay_at`), which `torch.optim.lr_scheduler.LambdaLR` alone cannot change.

Schedules (`TrainConfig.schedule`):
  cosine     linear warmup, then cosine decay to `min_lr_ratio` of the peak
  wsd        linear warmup, stable, then a linear decay over the last `decay_fraction` of steps
  two_stage  BitNet b1.58's (and TriLM's) two stages: the cosine schedule, multiplied by
             `stage2_lr_ratio` from step `stage2_at * steps` on; weight decay switches to
             `stage2_weight_decay` (0: off) at `weight_decay_stage2_at` (default: with the LR)

Sources of the two-stage schedule, and where they are ambiguous:
  - BitNet b1.58 2B4T (arXiv 2504.12285, section "Pre-training"): stage 1 is a cosine decay
    from a high peak; "approximately midway" the LR is "abruptly decayed" and follows a cosine
    with a lower peak; weight decay follows "a cosine schedule, reaching a peak value of 0.1" in
    stage 1 and is "set to zero" in stage 2. The report gives no learning-rate figures, and what
    a cosine weight decay "reaching a peak" means is not said: weight decay is held constant in
    stage 1 here.
  - "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (microsoft/unilm, bitnet/; the companion
    of arXiv 2402.17764) gives per-size pairs such as 1.5e-3 -> 1e-3 (700M) and 1.2e-3 -> 8e-4
    (1.3B), i.e. a stage-2 peak of 2/3 of the stage-1 peak, and weight decay 0.1 -> 0. Read here
    as the peaks of the two stages' curves (hence the multiplied cosine); that document was
    read second-hand (its figures as quoted by reproductions), not from the PDF itself.
  - Spectra (TriLM, arXiv 2407.12327) drops the peak LR at half of training and removes weight
    decay at two thirds: `weight_decay_stage2_at` lets the weight decay switch on its own step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ternarylm.config import TrainConfig

def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and learned quantizer scales are left alone.

    The decaying group comes first; `TrainSchedule` changes the weight decay of groups whose
    initial weight decay is not zero.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "weight_quantizer" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _cosine(t: TrainConfig, step: int) -> float:
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage2_step(fraction: float, steps: int) -> int:
    """First optimizer step (0-based) of stage 2 when it starts at `fraction` of `steps`."""
    return int(fraction * steps)


def lr_factor(t: TrainConfig, step: int) -> float:
    """Learning rate as a fraction of the peak `t.lr` at optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        return _cosine(t, step)
    if t.schedule == "two_stage":
        late = step >= stage2_step(t.stage2_at, t.steps)
        return _cosine(t, step) * (t.stage2_lr_ratio if late else 1.0)
    decay_start = t.steps - int(t.decay_fraction * t.steps)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, t.steps - decay_start)
    return 1.0 - (1 - t.min_lr_ratio) * min(1.0, progress)


def weight_decay_at(t: TrainConfig, step: int) -> float:
    """Weight decay of the decaying parameter group at optimizer step `step` (0-based)."""
    if t.schedule != "two_stage":
        return t.weight_decay
    at = t.stage2_at if t.weight_decay_stage2_at is None else t.weight_decay_stage2_at
    return t.stage2_weight_decay if step >= stage2_step(at, t.steps) else t.weight_decay


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR factor for fine-tuning: warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


class TrainSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over `lr_factor` that also sets the weight decay of the decaying groups.

    Step it once per optimizer step (DeepSpeed does, given it as `lr_scheduler`): after k steps
    the optimizer holds the learning rate and weight decay of step k.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
        # Set before LambdaLR's constructor, which takes the first step.
        self.train = train
        self.decaying = [g["weight_decay"] != 0 for g in optimizer.param_groups]
        super().__init__(optimizer, lambda step: lr_factor(train, step))

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._set_weight_decay()

    def _set_weight_decay(self) -> None:
        weight_decay = weight_decay_at(self.train, self.last_epoch)
        for group, decaying in zip(self.optimizer.param_groups, self.decaying):
            if decaying:
                group["weight_decay"] = weight_decay

    def state_dict(self) -> dict[str, Any]:
        # The config and group flags are rebuilt by the constructor; checkpoints keep plain data.
        return {k: v for k, v in super().state_dict().items() if k not in ("train", "decaying")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run's optimizer may hold the configured weight decay, not the step's.
        super().load_state_dict(state_dict)
        self._set_weight_decay()
