"""Class weighting and losses for imbalanced nodule data (the seed's focal-loss recipe)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

WEIGHT_METHODS = ("effective", "inverse", "sqrt_inverse")


def calculate_class_weights(labels: Sequence[int], num_classes: int = 2, method: str = "effective",
                            beta: float = 0.999) -> torch.Tensor:
    """Per-class weights, normalised to sum to ``num_classes``.

    ``effective``: (1 - beta) / (1 - beta^n) (Cui et al., CVPR 2019, "effective number of samples");
    ``inverse``: 1 / n; ``sqrt_inverse``: 1 / sqrt(n). A class with no sample gets the largest weight.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"class-weight method must be one of {WEIGHT_METHODS}, not {method!r}")
    counts = np.bincount(np.asarray(labels, int), minlength=num_classes).astype(float)
    n = np.maximum(counts, 1.0)
    if method == "effective":
        weights = (1 - beta) / (1 - beta**n)
    elif method == "inverse":
        weights = 1 / n
    else:
        weights = 1 / np.sqrt(n)
    weights = weights / weights.sum() * num_classes
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t, averaged over the batch."""

    def __init__(self, alpha: torch.Tensor | Sequence[float] | None = None, gamma: float = 2.0):
        super().__init__()
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


class CombinedLoss(nn.Module):
    """``focal_weight`` * focal loss + (1 - ``focal_weight``) * class-weighted cross-entropy."""

    def __init__(self, alpha: torch.Tensor | Sequence[float] | None = None, gamma: float = 2.0,
                 focal_weight: float = 0.5):
        super().__init__()
        self.focal = FocalLoss(alpha, gamma)
        weight = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        self.ce = nn.CrossEntropyLoss(weight=weight)
        self.focal_weight = focal_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.focal_weight * self.focal(logits, target) + (1 - self.focal_weight) * self.ce(logits, target)


def make_loss(name: str, alpha: torch.Tensor | None, gamma: float) -> nn.Module:
    """``focal`` (the seed's default), ``combined`` or ``ce``."""
    if name == "focal":
        return FocalLoss(alpha, gamma)
    if name == "combined":
        return CombinedLoss(alpha, gamma)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=alpha)
    raise ValueError(f"loss must be focal, combined or ce, not {name!r}")
