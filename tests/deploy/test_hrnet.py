"""The top-down keypoint net on HRNet (timm's ``hrnet_w18_small``, 64-pixel crops): the keypoint
interface, strict weights, the ``hrnet`` alias of older bundles, export with parity, and a bundle
with ``keypoints: topdown_heatmap`` through ``cp-deploy batch`` on the torch and onnxruntime engines."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cp_deploy.bundle import BUNDLE_FILE, load_bundle, write_bundle
from cp_deploy.errors import WeightsError
from cp_deploy.models.build import build_models, init_bundle
from cp_deploy.models.families.topdown_heatmap import TopDownHeatmapNet, load_backbone
from cp_deploy.models.keypoints import decode_heatmaps
from cp_deploy.models.registry import build_keypoint_net, keypoint_family
from cp_deploy.models.weights import save_state_dict
from tests.conftest import TINY_PROMPT, TOPDOWN_TINY, batch_on_torch_and_onnxruntime

CONFIG = TOPDOWN_TINY


@pytest.fixture(scope="module")
def hrnet_bundle(tmp_path_factory):
    return init_bundle(tmp_path_factory.mktemp("hrnet"), "tiny", seed=0, prompt=TINY_PROMPT,
                       keypoints=("topdown_heatmap", CONFIG))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_keypoint_net("topdown_heatmap", CONFIG).eval()


def test_heatmaps_are_a_quarter_of_the_crop_per_instance(net):
    images = torch.randn(2, 3, 128, 128)
    rois = torch.tensor([[0, 10.0, 12.0, 70.0, 90.0], [1, 0.0, 0.0, 128.0, 128.0], [1, 40.0, 30.0, 60.0, 44.0]])
    with torch.no_grad():
        heat = net(images, rois)
        alone = net(images[1:], torch.cat([torch.zeros(1, 1), rois[2:, 1:]], 1))
        empty = net(images, rois[:0])
    assert heat.shape == (3, 8, 16, 16) and empty.shape == (0, 8, 16, 16)
    # An instance's maps depend on its own image and box only: not on the batch or other instances.
    torch.testing.assert_close(alone[0], heat[2], atol=1e-5, rtol=1e-4)
    pts, conf = decode_heatmaps(heat, rois[:, 1:])
    assert pts.shape == (3, 8, 2) and conf.shape == (3, 8)
    assert ((pts >= rois[:, None, 1:3]) & (pts <= rois[:, None, 3:])).all()  # points land in their crop


def test_crop_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        TopDownHeatmapNet("hrnet_w18_small", crop_size=48)


def test_keypoint_weights_of_another_config_name_the_keys(hrnet_bundle, tmp_path):
    other = build_keypoint_net("topdown_heatmap", {**CONFIG, "head_channels": 16})
    shutil.copytree(hrnet_bundle.root, tmp_path / "bad")
    spec = json.loads((tmp_path / "bad" / "bundle.json").read_text())
    bad = write_bundle(tmp_path / "bad", spec, {"keypoints": other})
    with pytest.raises(WeightsError, match=r"keypoints\.safetensors does not match.*shape mismatch: head\.0\.weight"):
        build_models(bad)


def test_backbone_checkpoint_loads_strictly(net, tmp_path):
    """A timm HRNet classifier checkpoint (its classification head dropped) loads; a checkpoint
    of another backbone is refused with the first mismatching keys."""
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("hrnet_w18_small", pretrained=False)
    torch.save(classifier.state_dict(), tmp_path / "w18.pth")
    target = build_keypoint_net("topdown_heatmap", CONFIG)
    load_backbone(target, tmp_path / "w18.pth")
    torch.testing.assert_close(target.backbone.conv1.weight, classifier.conv1.weight)
    state = {k: v for k, v in classifier.state_dict().items() if k != "conv1.weight"}
    state["stem.weight"] = classifier.conv1.weight
    save_state_dict(state, tmp_path / "renamed.safetensors")
    with pytest.raises(WeightsError, match=r"renamed\.safetensors.*missing: conv1\.weight; unexpected: stem\.weight"):
        load_backbone(target, tmp_path / "renamed.safetensors")


def test_hrnet_alias_keeps_loading_and_new_bundles_name_the_family(hrnet_bundle, tmp_path):
    """Bundles that say ``hrnet`` (the shipped default among them) build the top-down net with the
    same weights; the bundles the code writes name the family, never the alias."""
    assert keypoint_family("hrnet") is keypoint_family("topdown_heatmap")
    written = init_bundle(tmp_path / "new", "tiny", seed=0, keypoints=("hrnet", CONFIG))
    assert written.keypoints.arch == "topdown_heatmap"
    shutil.copytree(hrnet_bundle.root, tmp_path / "old")
    spec = json.loads((tmp_path / "old" / BUNDLE_FILE).read_text())
    spec["keypoints"]["arch"] = "hrnet"
    (tmp_path / "old" / BUNDLE_FILE).write_text(json.dumps(spec))
    old = build_models(load_bundle(tmp_path / "old")).keypoints
    new = build_models(hrnet_bundle).keypoints
    assert type(old) is TopDownHeatmapNet
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())


pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")


def test_hrnet_bundle_exports_with_parity_and_runs_on_both_engines(hrnet_bundle, tmp_path):
    """The top-down keypoint net end to end: cp-export onnx (parity checked on its graph
    with dynamic instance counts), then cp-deploy batch with torch and onnxruntime agree."""
    from export.cli import main as export_main

    graphs = tmp_path / "onnx"
    assert export_main(["onnx", "--bundle", str(hrnet_bundle.root), "--out", str(graphs)]) == 0
    m = json.loads((graphs / "manifest.json").read_text())
    kp = m["graphs"]["keypoints"]
    assert [t["shape"] for t in kp["inputs"]] == [["batch", 3, 128, 128], ["instances", 5]]
    assert kp["outputs"][0]["shape"] == ["instances", 8, 16, 16]
    parity = m["parity"]
    assert parity["passed"], parity["failures"]
    assert {"random", "real"} <= set(parity["graphs"]["keypoints"])
    assert max(parity["graphs"]["keypoints"].values()) <= 1e-3 * max(1.0, parity["scale"]["keypoints"])

    out_t, out_o = batch_on_torch_and_onnxruntime(hrnet_bundle, graphs, tmp_path, 3)
    ref = {r["path"]: r for r in map(json.loads, (out_t / "results.jsonl").read_text().splitlines())}
    got = {r["path"]: r for r in map(json.loads, (out_o / "results.jsonl").read_text().splitlines())}
    assert ref.keys() == got.keys() and len(ref) == 3
    points = [(np.array(i["points"]), np.array(j["points"]))
              for k in ref for i, j in zip(ref[k]["instances"], got[k]["instances"], strict=True)]
    assert points and all(a.shape == (8, 2) for a, _ in points), "the tiny detector should yield instances"
    for a, b in points:
        np.testing.assert_allclose(b, a, atol=0.05)


def test_lite0_backbone_gives_quarter_heatmaps_and_imagenet_weights():
    """The top-down net takes EfficientNet-Lite0 (ImageNet weights from its pip package) as well as
    HRNet: same interface, heatmaps at 1/4 of the crop, and the weights load into the backbone."""
    from cp_deploy.models.efficientnet import lite0_imagenet, load_lite0_features

    cfg = keypoint_family("topdown_heatmap").default_config(backbone="efficientnet_lite0", crop_size=64,
                                                            head_channels=32)
    lite = build_keypoint_net("topdown_heatmap", cfg).eval()
    load_lite0_features(lite.backbone)
    imagenet = lite0_imagenet(True).state_dict()
    assert torch.equal(lite.backbone.state_dict()["blocks.3.0.conv_pw.weight"], imagenet["blocks.3.0.conv_pw.weight"])
    with torch.no_grad():
        heat = lite(torch.randn(1, 3, 96, 96), torch.tensor([[0, 5.0, 8.0, 60.0, 70.0]]))
    assert heat.shape == (1, 8, 16, 16)
