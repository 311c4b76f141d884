"""Dice + BCE for masks, and CenterNet's focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE on mask logits (the paper's loss), averaged over instances."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).float()
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target.float())


def centernet_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on a Gaussian heatmap target (1 at centres)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)
