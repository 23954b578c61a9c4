"""AdamW for a cohort: one optimizer over the stacked parameters, hyperparameters per member.

Written by hand because no library takes hyperparameters per slice of a tensor: torch's AdamW
(and DeepSpeed's, and apex's) takes one learning rate, weight decay and pair of betas per
parameter group, and a cohort's members are slices [m] of one tensor. Here each of them is a
vector over members, broadcast as [M, 1, ...] against a stacked tensor (or read at m for a
parameter only member m has, a learned quantizer's scale), so one step updates every member
with its own settings. The update is torch.optim.AdamW's (decoupled weight decay, bias
correction, eps 1e-8), in the same order of operations; its fused kernel rounds differently.

Each member's schedule is its own `optim.lr_factor` / `optim.weight_decay_at` of its own
TrainConfig. Before the update every member's gradient is clipped to its own `grad_clip` by its
own global norm (over its slices only), with DeepSpeed's formula (coef = min(1, clip / (norm +
1e-6))), so DeepSpeed's gradient_clipping stays off. A frozen member (diverged) gets no
update: its gradient is dropped and its learning rate is zero, whatever its values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ternarylm.training.optim import lr_factor, weight_decay_at

if TYPE_CHECKING:
    from ternarylm.config import TrainConfig
    from ternarylm.training.stacked import StackedLM

EPS = 1e-8  # torch.optim.AdamW's default, which solo trials use
CLIP_EPS = 1e-6  # DeepSpeed's clip_grad_norm_


class MemberAdamW(torch.optim.Optimizer):
    """AdamW over a `StackedLM`'s parameters with each member's TrainConfig; `freeze(m)` stops
    member m. Its step count (the schedules' position) is saved in its state dict."""

    def __init__(self, model: StackedLM, trains: list[TrainConfig]) -> None:
        decay, no_decay = {"params": [], "members": []}, {"params": [], "members": []}
        for name, p, member in model.member_parameters():
            # As optim.param_groups for one member: matrices decay; norms and scales do not.
            matrix = member is None and p.ndim - 1 >= 2
            group = decay if matrix else no_decay
            group["params"].append(p)
            group["members"].append(member)
        decay["decay"], no_decay["decay"] = True, False
        super().__init__([decay, no_decay], {"lr": trains[0].lr, "step": 0})
        self.trains = trains
        self.frozen = torch.zeros(len(trains), dtype=torch.bool)
        self.nonfinite: list[int] = []
        """Members whose gradient norm was not finite at the last step (frozen there)."""
        self._set_display_lr()

    @property
    def steps_taken(self) -> int:
        return self.param_groups[0]["step"]

    def freeze(self, member: int) -> None:
        self.frozen[member] = True

    def lrs(self) -> list[float]:
        """Each member's learning rate at the next step (what a solo trial's engine reports)."""
        return [t.lr * lr_factor(t, self.steps_taken) for t in self.trains]

    def _set_display_lr(self) -> None:
        # DeepSpeed reads param_groups' lr (get_lr); one number cannot hold M rates.
        for group in self.param_groups:
            group["lr"] = self.lrs()[0]

    def _vector(self, values: list[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def grad_norms(self) -> torch.Tensor:
        """Each member's global gradient norm over its own slices and parameters, [M]."""
        device = self.param_groups[0]["params"][0].device
        squares = torch.zeros(len(self.trains), dtype=torch.float32, device=device)
        for group in self.param_groups:
            for p, member in zip(group["params"], group["members"]):
                if p.grad is None:
                    continue
                g = p.grad.float()
                if member is None:
                    squares += g.square().flatten(1).sum(1)
                else:
                    squares[member] += g.square().sum()
        return squares.sqrt()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        device = self.param_groups[0]["params"][0].device
        norms = self.grad_norms()
        finite = torch.isfinite(norms)
        self.nonfinite = [m for m in range(len(self.trains))
                          if not finite[m] and not self.frozen[m]]
        self.frozen |= ~finite.cpu()
        live = ~self.frozen.to(device)
        k = self.steps_taken
        clip = self._vector([t.grad_clip for t in self.trains], device)
        coef = (clip / (norms + CLIP_EPS)).clamp(max=1.0)
        lr = self._vector(self.lrs(), device) * live
        wd = self._vector([weight_decay_at(t, k) for t in self.trains], device)
        beta1 = self._vector([t.betas[0] for t in self.trains], device)
        beta2 = self._vector([t.betas[1] for t in self.trains], device)
        bc1, bc2 = 1 - beta1 ** (k + 1), 1 - beta2 ** (k + 1)
        for group in self.param_groups:
            for p, member in zip(group["params"], group["members"]):
                if p.grad is None:
                    continue

                def per(v: torch.Tensor) -> torch.Tensor:
                    # [M] -> [M, 1, ...] against a stacked tensor, member m's value otherwise
                    return v.view(-1, *[1] * (p.ndim - 1)) if member is None else v[member]

                g = torch.where(per(live), p.grad * per(coef), 0.0)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if group["decay"]:
                    p.mul_(1 - per(lr) * per(wd))
                exp_avg.lerp_(g, 1 - per(beta1))
                exp_avg_sq.mul_(per(beta2)).add_(g * g * (1 - per(beta2)))
                denom = (exp_avg_sq.sqrt() / per(bc2).sqrt()).add_(EPS)
                p.sub_(per(lr / bc1) * exp_avg / denom)
        for group in self.param_groups:
            group["step"] = k + 1
        self._set_display_lr()
