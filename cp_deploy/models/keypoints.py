"""The keypoint geometry every keypoint family shares: top-down, 8 edge points per box.

Top-down means: expand the box by a margin, crop it from the features the net reads (the image
or the SAM embedding) with RoIAlign, predict one heatmap per edge point on the crop, decode the
peak with sub-pixel refinement, and map it back through the crop to input pixels. Cropping,
decoding and the inverse mapping live here as functions so training targets use the same geometry;
the nets themselves are families (``cp_deploy.models.families``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_EDGE_POINTS = 8


def expand_boxes(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """Grow Nx4 xyxy boxes by ``margin`` of their size on every side (at least 1 px wide)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    return torch.cat([boxes[:, :2] - margin * wh, boxes[:, 2:] + margin * wh], dim=1)


def heatmap_to_image(xy: torch.Tensor, crops: torch.Tensor, heatmap_size: int) -> torch.Tensor:
    """NxPx2 heatmap coordinates (pixel centres at integers) -> input pixels, through Nx4 crops."""
    scale = (crops[:, 2:] - crops[:, :2]) / heatmap_size
    return crops[:, None, :2] + (xy + 0.5) * scale[:, None, :]


def image_to_heatmap(xy: torch.Tensor, crops: torch.Tensor, heatmap_size: int) -> torch.Tensor:
    """Inverse of :func:`heatmap_to_image` (used to place training targets)."""
    scale = (crops[:, 2:] - crops[:, :2]) / heatmap_size
    return (xy - crops[:, None, :2]) / scale[:, None, :] - 0.5


def decode_heatmaps(heatmaps: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NxPxHxW logits (a spatial softmax per map) -> (NxPx2 points in input pixels, NxP peak
    probabilities).

    Sub-pixel refinement fits a parabola through the peak and its two neighbours on each axis.
    """
    n, p, h, w = heatmaps.shape
    hm = heatmaps.float()
    flat = hm.view(n, p, -1)
    conf, idx = flat.max(dim=2)
    ys = torch.div(idx, w, rounding_mode="floor")
    xs = idx % w

    def refine(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        denom = lo - 2 * c + hi
        shift = torch.where(denom < 0, 0.5 * (lo - hi) / denom.clamp(max=-1e-6), torch.zeros_like(c))
        return shift.clamp(-0.5, 0.5)

    padded = F.pad(hm, (1, 1, 1, 1), mode="replicate").view(n, p, -1)
    wp = w + 2

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded.gather(2, ((ys + 1 + dy) * wp + xs + 1 + dx).unsqueeze(2)).squeeze(2)

    dx = refine(conf, at(0, -1), at(0, 1))
    dy = refine(conf, at(-1, 0), at(1, 0))
    xy = torch.stack([xs.float() + dx, ys.float() + dy], dim=2)
    return heatmap_to_image(xy, crops, w), torch.softmax(flat, dim=2).amax(dim=2)


class KeypointEnsemble(nn.Module):
    """N keypoint nets of one arch and config on the same crops, fused by averaging their heatmap
    logits (the spatial softmax of the mean is the normalised geometric mean of the members'
    maps), so decoding and the exported graph stay a single net's."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(features, rois) for m in self.members]).mean(0)

