"""``embedding_heatmap``: a small top-down heatmap head on RoIAlign crops of the SAM embedding."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from cp_deploy.models.keypoints import NUM_EDGE_POINTS, KeypointEnsemble
from cp_deploy.models.registry import KeypointFamily, from_config, register


class EmbeddingKeypointNet(nn.Module):
    """Heatmaps for the 8 edge points on ``crop_size`` RoIAlign crops of the embedding, upsampled
    twice. ``spatial_scale`` is embedding cells per input pixel; ``margin`` is read by the pipeline
    and the trainer, which expand the box by it before cropping."""

    def __init__(
        self,
        in_channels: int = 256,
        hidden: int = 64,
        crop_size: int = 16,
        spatial_scale: float = 0.25,
        margin: float = 0.15,
    ) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.spatial_scale = spatial_scale
        self.margin = margin
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, NUM_EDGE_POINTS, 1),
        )

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``rois``: Nx5 (image index, x0, y0, x1, y1) crops in input pixels -> Nx8xHxW logits."""
        crops = roi_align(features, rois, self.crop_size, self.spatial_scale, sampling_ratio=2, aligned=True)
        return self.body(crops)


def default_config(channels: int = 256, stride: int = 4, **_) -> dict:
    """The head for a SAM embedding of ``channels`` and ``stride`` (input pixels per cell)."""
    return {"in_channels": channels, "hidden": 64, "crop_size": 16, "spatial_scale": 1.0 / stride, "margin": 0.15}


FAMILY = register(KeypointFamily("embedding_heatmap", "embedding", from_config(EmbeddingKeypointNet), default_config,
                                 ensemble=KeypointEnsemble))
