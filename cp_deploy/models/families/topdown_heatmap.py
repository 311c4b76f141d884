"""``topdown_heatmap`` (bundles may say ``hrnet``): a timm backbone on RoIAlign crops of the image,
heatmaps at 1/4 of the crop.

The backbone is the paper's HRNet or any timm features model (the default bundle's is
EfficientNet-Lite0). The head is HRNetV2's: every branch upsampled to the stride-4 one and
concatenated, then two 1x1 convolutions (the thin w18-small stride-4 branch alone carries only 16
channels).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from cp_deploy.models.keypoints import NUM_EDGE_POINTS, KeypointEnsemble
from cp_deploy.models.registry import KeypointFamily, from_config, register
from cp_deploy.models.weights import load_strict, read_state_dict

# timm's ImageNet classifier checkpoints hold these on top of the backbone the features model keeps.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
# The deepest stride of the backbones' four levels: a crop must divide by it.
DEEPEST_STRIDE = 32


class TopDownHeatmapNet(nn.Module):
    """Top-down heatmaps for the 8 edge points on crops of the preprocessed image.

    ``crop_size`` is the RoIAlign output side (divisible by 32); heatmaps are ``crop_size // 4``
    square. ``margin`` is read by the pipeline and the trainer, which expand the box by it before
    cropping; ``sigma`` is the training targets' spread, in heatmap cells, kept with the model it
    trained.
    """

    def __init__(
        self,
        backbone: str = "hrnet_w32",
        crop_size: int = 256,
        head_channels: int = 128,
        margin: float = 0.15,
        sigma: float = 2.0,
    ) -> None:
        super().__init__()
        if crop_size % DEEPEST_STRIDE:
            raise ValueError(f"topdown_heatmap crop_size must be a multiple of {DEEPEST_STRIDE} (the backbone's "
                             f"deepest stride), got {crop_size}")
        self.crop_size = crop_size
        self.margin = margin
        self.sigma = sigma
        # HRNet's raw branches (feature_location ""), not its classifier's incre modules; other timm
        # backbones (EfficientNet-Lite0, whose ImageNet weights ship in a pip package) as they come.
        extra = {"feature_location": ""} if backbone.startswith("hrnet") else {}
        self.backbone = timm.create_model(backbone, features_only=True, pretrained=False, out_indices=(1, 2, 3, 4),
                                          **extra)
        channels = sum(self.backbone.feature_info.channels())
        self.head = nn.Sequential(
            nn.Conv2d(channels, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, NUM_EDGE_POINTS, 1),
        )

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``features``: Bx3xSxS preprocessed images; ``rois``: Nx5 (image index, x0, y0, x1, y1) in
        their pixels -> Nx8x(crop/4)x(crop/4) logits."""
        crops = roi_align(features, rois, self.crop_size, 1.0, sampling_ratio=2, aligned=True)
        branches = self.backbone(crops)
        size = branches[0].shape[-2:]
        up = [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches[1:]]
        return self.head(torch.cat(up, dim=1))


def load_backbone(net: TopDownHeatmapNet, path: str | Path) -> None:
    """Load backbone weights (a timm classifier checkpoint, e.g. HRNet's ImageNet one) from a local
    file. The classifier's own head (``incre_modules``, ``classifier``, ...) is dropped; every other
    key must match the backbone exactly, else the error lists the first mismatching keys."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    load_strict(net.backbone, state, source=str(path))


def default_config(backbone: str = "hrnet_w32", crop_size: int = 256, head_channels: int = 128, **_) -> dict:
    """15% box margin, heatmaps of crop/4, target sigma 2 cells."""
    return {"backbone": backbone, "crop_size": crop_size, "head_channels": head_channels, "margin": 0.15,
            "sigma": 2.0}


FAMILY = register(KeypointFamily("topdown_heatmap", "image", from_config(TopDownHeatmapNet), default_config,
                                 ensemble=KeypointEnsemble, aliases=("hrnet",)))
