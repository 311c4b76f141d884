"""Test-time flips folded into the detector: each flipped view's maps come back to the input's
cells and offsets, the weights keep their names, and a bundle turns them on in its config."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from cp_deploy.bundle import load_bundle
from cp_deploy.errors import BundleError
from cp_deploy.models.build import build_models, init_bundle
from cp_deploy.models.centernet import FlipViews, decode_centernet
from cp_deploy.pipeline import CurriculumPipeline
from tests.conftest import TINY_PROMPT


@pytest.fixture(scope="module")
def tiny_image_detector_bundle(tmp_path_factory):
    """The tiny bundle with a random EfficientNet-Lite0 CenterNet on 64-pixel images."""
    return init_bundle(tmp_path_factory.mktemp("lite0"), "tiny", seed=0, prompt=TINY_PROMPT,
                       detector=("lite0_centernet", {"fpn": 16, "stride": 8}), detector_size=64)


class BlobCenterNet(nn.Module):
    """A stand-in CenterNet that is exact by construction: one centre at the brightest pixel of
    channel 0 (its centre, ``i + 0.5``), in the right cell with the right in-cell offset."""

    stride = 8

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        gh, gw = h // self.stride, w // self.stride
        heat = torch.full((n, 1, gh, gw), -10.0)
        offset = torch.zeros(n, 2, gh, gw)
        for b in range(n):
            i = int(x[b, 0].argmax())
            cy, cx = (i // w + 0.5) / self.stride, (i % w + 0.5) / self.stride
            iy, ix = int(cy), int(cx)
            heat[b, 0, iy, ix] = 5.0
            offset[b, :, iy, ix] = torch.logit(torch.tensor([cx - ix, cy - iy]))
        return {"heatmap": heat, "size": torch.full((n, 2, gh, gw), math.log(3.0)), "offset": offset}


@pytest.mark.parametrize("flips", [("h",), ("v",), ("h", "v", "hv")])
def test_flipped_views_decode_to_the_same_box(flips):
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 37, 21] = 1.0  # not on a cell corner: the offsets matter
    plain = decode_centernet(BlobCenterNet()(x), 8)[0][0][0]
    fused = decode_centernet(FlipViews(BlobCenterNet(), flips)(x), 8)[0][0][0]
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=0)
    assert plain.tolist() == pytest.approx([21.5 - 12, 37.5 - 12, 21.5 + 12, 37.5 + 12], abs=1e-4)


def test_flips_refuse_unknown_views():
    with pytest.raises(ValueError, match="flips"):
        FlipViews(BlobCenterNet(), ("x",))


def _with_config(bundle, tmp_path, **config):
    out = tmp_path / "b"
    shutil.copytree(bundle.root, out)
    spec = json.loads((out / "bundle.json").read_text())
    spec["detector"]["config"].update(config)
    (out / "bundle.json").write_text(json.dumps(spec))
    return load_bundle(out)


def test_a_bundle_turns_flips_on_and_keeps_its_weights(tiny_image_detector_bundle, tmp_path):
    """``detector.config.flips`` wraps the loaded detector; the pipeline's boxes on an image are
    then the mean of the plain and mirrored views (their maps, averaged), so they change."""
    b = tiny_image_detector_bundle
    flipped = _with_config(b, tmp_path, flips=["h"])
    plain_net, flip_net = build_models(b).detector, build_models(flipped).detector
    assert isinstance(flip_net, FlipViews) and not isinstance(plain_net, FlipViews)
    for (k, v), (k2, v2) in zip(plain_net.state_dict().items(), flip_net.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(1, 3, *[b.detector.preprocess.image_size] * 2)
    with torch.no_grad():
        fused, a, m = flip_net(x), plain_net(x), plain_net(x.flip(3))
    p = (torch.sigmoid(a["heatmap"]) + torch.sigmoid(m["heatmap"].flip(3))) / 2
    torch.testing.assert_close(torch.sigmoid(fused["heatmap"]), p, atol=1e-5, rtol=1e-4)
    offset_x = (a["offset"][:, 0] - m["offset"].flip(3)[:, 0]) / 2
    torch.testing.assert_close(fused["offset"][:, 0], offset_x, atol=1e-5, rtol=1e-4)
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    CurriculumPipeline.from_bundle(flipped.root).predict([img])  # runs end to end


def test_a_bundle_naming_bad_flips_is_one_line(tiny_image_detector_bundle, tmp_path):
    bad = _with_config(tiny_image_detector_bundle, tmp_path, flips=["sideways"])
    with pytest.raises(BundleError, match=r"bundle.json: 'detector.config.flips'"):
        build_models(bad)


def test_flips_are_in_the_exported_graph(tiny_image_detector_bundle, tmp_path):
    """cp-export puts the mirrored view inside the detector graph (its parity check runs, against
    the torch engine that flips too), and ONNX Runtime then gives the torch engine's masks."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")
    from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
    from export.cli import main as export_main

    flipped = _with_config(tiny_image_detector_bundle, tmp_path, flips=["h"])
    assert export_main(["onnx", "--bundle", str(flipped.root), "--out", str(tmp_path / "g")]) == 0
    x = torch.randn(2, 3, *[flipped.detector.preprocess.image_size] * 2)
    ort = OnnxRuntimeEngine(flipped, onnx_dir=tmp_path / "g").detect(x)
    with torch.no_grad():
        ref = build_models(flipped).detector(x)
        plain = build_models(tiny_image_detector_bundle).detector(x)
    for k in ref:  # the graph's maps are the flipped ensemble's, not the plain detector's
        torch.testing.assert_close(ort[k], ref[k], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ref["heatmap"], plain["heatmap"], atol=1e-3)
