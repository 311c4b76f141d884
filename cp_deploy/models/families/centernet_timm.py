"""``lite0_centernet``: CenterNet on timm's EfficientNet-Lite0, reading the preprocessed image."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cp_deploy.models import centernet
from cp_deploy.models.efficientnet import load_lite0_features
from cp_deploy.models.registry import register

STRIDE = 8


class Lite0CenterNet(nn.Module):
    """CenterNet on EfficientNet-Lite0 features (strides 8, 16, 32) merged top-down at stride 8.
    ``pretrained`` loads the ImageNet backbone weights (a training start, never in a bundle)."""

    def __init__(self, fpn: int = 64, stride: int = STRIDE, pretrained: bool = False) -> None:
        super().__init__()
        if stride != STRIDE:
            raise ValueError(f"Lite0CenterNet predicts at stride {STRIDE}")
        self.stride = stride
        self.backbone = timm.create_model(
            "efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4)
        )
        if pretrained:
            load_lite0_features(self.backbone)
        chans = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn, 1) for c in chans)
        self.smooth = nn.Sequential(nn.Conv2d(fpn, fpn, 3, padding=1), nn.BatchNorm2d(fpn), nn.ReLU(inplace=True))
        self.heatmap = nn.Sequential(nn.Conv2d(fpn, fpn, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(fpn, 1, 1))
        self.size = nn.Sequential(nn.Conv2d(fpn, fpn, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(fpn, 2, 1))
        self.offset = nn.Sequential(nn.Conv2d(fpn, fpn, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(fpn, 2, 1))
        nn.init.constant_(self.heatmap[-1].bias, centernet.HEATMAP_PRIOR)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        p = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            p = lat(f) + F.interpolate(p, size=f.shape[-2:], mode="nearest")
        p = self.smooth(p)
        return {"heatmap": self.heatmap(p), "size": self.size(p), "offset": self.offset(p)}


def default_config(fpn: int = 64, **_) -> dict:
    """An FPN of ``fpn`` channels; the net predicts at stride 8 only."""
    return {"fpn": fpn, "stride": STRIDE}


FAMILY = register(centernet.family("lite0_centernet", "image", Lite0CenterNet, STRIDE, default_config))
