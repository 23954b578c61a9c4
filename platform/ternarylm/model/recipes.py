"""Named training recipes: architecture + ternary scheme + precision plan + schedule.

A recipe is a set of TrialConfig field overrides, so a study can list `recipes: [...]` as one
axis and compare the recipes that define the field at equal budget: the study's own settings
(size, steps, batch, peak learning rate, data) stay the same across recipes, and each recipe
brings what sets it apart. Recipes leave the peak learning rate to the study: the published
figures belong to models 1000x larger than the ones trained here, on other batch sizes.

  fp           the paper's FP control (Llama block, no quantization)
  paper        the TernaryLM paper (arXiv 2602.07374): Llama block, ternary with a learned
               per-layer scale, 8-bit per-token activations, cosine, weight decay 0.01
  bitnet_b158  BitNet b1.58 2B4T (arXiv 2504.12285): BitNet block (sub-norms, ReLU^2 GLU),
               absmean ternary weights, 8-bit per-token absmax activations, output head and
               embedding in floating point, two-stage schedule (LR x 2/3 and weight decay
               0.1 -> 0 at mid-training; see ternarylm.training.optim for the sources)
  trilm        TriLM (Spectra, arXiv 2407.12327): Llama block, absmean with one scale per
               model-parallel shard (1 shard at these sizes), weights only (16-bit
               activations), LR dropped at half and weight decay 0.1 removed at two thirds.
               The drop ratio is BitNet's 2/3: Spectra's own per-size LR pairs could not be
               checked here
  paretoq      ParetoQ ternary (arXiv 2502.02631): Llama block, stretched elastic quantizer
               with a learned per-row scale, weights only, cosine to 0 without weight decay
               (its run_train.sh); ParetoQ fine-tunes a pretrained model, here it trains from
               scratch
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ternarylm.core.errors import UserError

# A plan that quantizes every block linear's weights but not their inputs (W1.58A16).
WEIGHTS_ONLY_TERNARY = {"preset": "all_ternary", "name": "all_ternary_w_only",
                        "activation_bits": None}
_PAPER_TRAIN = {"schedule": "cosine", "weight_decay": 0.01}


class RecipeError(UserError):
    """An unknown recipe name; the message lists the known ones."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Name a study lists in its `recipes` axis."""
    block: str
    """ModelConfig.block: the architecture variant."""
    scheme: str
    """Ternary scheme wherever the plan says `ternary`."""
    plan: str | dict[str, Any]
    """Precision plan: a preset name or a mapping of plan fields."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields the recipe sets (schedule and weight decay; never steps or lr)."""

    def overrides(self) -> dict[str, Any]:
        """TrialConfig field overrides; merge `train` key by key into the study's."""
        return copy.deepcopy({"block": self.block, "scheme": self.scheme, "plan": self.plan,
                              "train": self.train})


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp", "llama", "absmean", "fp", _PAPER_TRAIN),
    Recipe("paper", "llama", "learned", "all_ternary", _PAPER_TRAIN),
    Recipe("bitnet_b158", "bitnet", "absmean", "all_ternary",
           {"schedule": "two_stage", "stage2_at": 0.5, "stage2_lr_ratio": 2 / 3,
            "weight_decay": 0.1, "stage2_weight_decay": 0.0}),
    Recipe("trilm", "llama", "trilm", WEIGHTS_ONLY_TERNARY,
           {"schedule": "two_stage", "stage2_at": 0.5, "stage2_lr_ratio": 2 / 3,
            "weight_decay": 0.1, "stage2_weight_decay": 0.0, "weight_decay_stage2_at": 2 / 3}),
    Recipe("paretoq", "llama", "paretoq", WEIGHTS_ONLY_TERNARY,
           {"schedule": "cosine", "min_lr_ratio": 0.0, "weight_decay": 0.0}),
)}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_overrides(name: str) -> dict[str, Any]:
    """The TrialConfig overrides of recipe `name` (a fresh copy the caller may change)."""
    return recipe(name).overrides()
