"""Dice + BCE for masks, and the keypoint heatmap loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE on mask logits (the paper's loss), averaged over instances."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).float()
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target.float())


def gaussian_heatmap_ce(logits: torch.Tensor, xy: torch.Tensor, sigma: float) -> torch.Tensor:
    """Spatial cross-entropy of NxPxHxW heatmap logits against a normalised Gaussian of ``sigma``
    cells around each NxPx2 target (heatmap coordinates, pixel centres at integers).

    Cross-entropy rather than per-pixel MSE: every map must commit to one peak (a per-pixel loss
    lets the sparse peaks drown in background), and the softmax peak that the decoder reports as
    the point's confidence then has a meaning.
    """
    h, w = logits.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d2 = (xx - xy[..., 0, None, None]) ** 2 + (yy - xy[..., 1, None, None]) ** 2
    target = torch.exp(-d2 / (2 * sigma**2)).flatten(2)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-8)
    return -(target * torch.log_softmax(logits.float().flatten(2), -1)).sum(-1).mean()
