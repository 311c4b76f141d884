"""``embedding_centernet``: a small CenterNet head on the frozen SAM image embedding."""

from __future__ import annotations

import torch
from torch import nn

from cp_deploy.models import centernet
from cp_deploy.models.registry import register

DEFAULT_STRIDE = 4


class EmbeddingCenterNet(nn.Module):
    """CenterNet head on the SAM embedding: a centre heatmap, box size and sub-cell offset per
    embedding cell. ``stride`` is model-input pixels per embedding cell."""

    def __init__(self, in_channels: int = 256, hidden: int = 64, stride: int = DEFAULT_STRIDE) -> None:
        super().__init__()
        self.stride = stride
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.heatmap = nn.Conv2d(hidden, 1, 1)
        self.size = nn.Conv2d(hidden, 2, 1)
        self.offset = nn.Conv2d(hidden, 2, 1)
        nn.init.constant_(self.heatmap.bias, centernet.HEATMAP_PRIOR)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {"heatmap": self.heatmap(f), "size": self.size(f), "offset": self.offset(f)}


def default_config(channels: int = 256, stride: int = DEFAULT_STRIDE, **_) -> dict:
    """The head for a SAM embedding of ``channels`` and ``stride`` (input pixels per cell)."""
    return {"in_channels": channels, "hidden": 64, "stride": stride}


FAMILY = register(centernet.family("embedding_centernet", "embedding", EmbeddingCenterNet, DEFAULT_STRIDE,
                                   default_config))
