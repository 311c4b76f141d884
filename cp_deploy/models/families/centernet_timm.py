"""``lite0_centernet``: CenterNet on a timm EfficientNet-Lite (Lite0 unless the config's
``backbone`` says ``efficientnet_lite1`` or ``efficientnet_lite2``), reading the preprocessed image."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cp_deploy.models import centernet
from cp_deploy.models.efficientnet import DEFAULT_BACKBONE, lite_weights, load_lite_features
from cp_deploy.models.registry import register

STRIDE = 8
# EfficientNet stages 2, 3 and 4 end at these strides in every Lite variant; their channels are
# the variant's (feature_info), so the FPN's laterals follow the backbone.
FEATURE_INDICES = (2, 3, 4)
FEATURE_STRIDES = [8, 16, 32]


class LiteCenterNet(nn.Module):
    """CenterNet on EfficientNet-Lite features (strides 8, 16, 32) merged top-down at stride 8.
    ``backbone`` is a timm EfficientNet-Lite name (see :data:`cp_deploy.models.efficientnet.LITE_BACKBONES`);
    ``pretrained`` loads its ImageNet weights (a training start, never in a bundle)."""

    def __init__(self, fpn: int = 64, stride: int = STRIDE, backbone: str = DEFAULT_BACKBONE,
                 pretrained: bool = False) -> None:
        super().__init__()
        if stride != STRIDE:
            raise ValueError(f"LiteCenterNet predicts at stride {STRIDE}")
        lite_weights(backbone)  # an unknown name fails here, before timm builds anything
        self.stride = stride
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=FEATURE_INDICES)
        if self.backbone.feature_info.reduction() != FEATURE_STRIDES:
            raise ValueError(f"{backbone}'s features {FEATURE_INDICES} have strides "
                             f"{self.backbone.feature_info.reduction()}, not {FEATURE_STRIDES}")
        if pretrained:
            load_lite_features(self.backbone)
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


def default_config(fpn: int = 64, backbone: str = DEFAULT_BACKBONE, **_) -> dict:
    """An FPN of ``fpn`` channels on ``backbone``; the net predicts at stride 8 only."""
    lite_weights(backbone)
    # Lite0 stays implicit: its configs match those of bundles written before the key existed,
    # which cp-train ensemble requires of members.
    return {"fpn": fpn, "stride": STRIDE, **({} if backbone == DEFAULT_BACKBONE else {"backbone": backbone})}


FAMILY = register(centernet.family("lite0_centernet", "image", LiteCenterNet, STRIDE, default_config))
