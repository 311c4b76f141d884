"""What made a run's masks: run.json's provenance, the report's table, and the ground truth drawn on
the report's overlays with IoU beside Dice."""

from __future__ import annotations

import base64
import json
import re
import sys

import cv2
import numpy as np
import pytest
import torch

import cp_deploy
from cp_deploy.cli import main
from cp_deploy.files import read_mask
from cp_deploy.metrics import iou
from cp_deploy.report import build_report
from cp_deploy.visualize import GROUND_TRUTH
from tests.conftest import make_images


@pytest.fixture(scope="module")
def run(tiny_bundle, tmp_path_factory):
    """A run with overlays and ground truth whose top rows disagree with the prediction."""
    base = tmp_path_factory.mktemp("provenance")
    inp, out, gt = base / "in", base / "out", base / "gt"
    make_images(inp, 2, sizes=((64, 80),))
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--overlays", "--no-progress", "--prompts", "box"]) == 0
    gt.mkdir()
    for i in range(2):
        g = read_mask(out / f"masks/img_{i:03d}.png").copy()
        g[10:30, 10:40] = True  # a square the prediction may miss: its contour must show
        cv2.imwrite(str(gt / f"img_{i:03d}.png"), g.astype(np.uint8) * 255)
    return out, gt


def test_run_json_records_provenance_beside_the_compared_settings(run, tiny_bundle, monkeypatch):
    out, _ = run
    info = json.loads((out / "run.json").read_text())
    prov = info["provenance"]
    assert prov["bundle_name"] == tiny_bundle.name and prov["bundle"] == str(tiny_bundle.root.resolve())
    assert prov["bundle_sha256"] == info["settings"]["bundle_sha256"] and len(prov["bundle_sha256"]) == 64
    assert (prov["engine"], prov["device"], prov["precision"], prov["graphs"]) == ("torch", "cpu", "fp32", None)
    assert prov["graph_precisions"] is None
    assert prov["prompt"]["prompts"] == "box" and prov["prompt"]["score_threshold"] == 0.05
    assert prov["cp_deploy_version"] == cp_deploy.__version__ and prov["torch_version"] == torch.__version__
    assert isinstance(prov["command"], list) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}",
                                                              prov["started"])
    assert prov["resumed"] is False
    assert "provenance" not in info["settings"]  # --resume compares the mask-changing settings alone

    # Another command line and start time resume the run: provenance is recorded, not compared.
    monkeypatch.setattr(sys, "argv", ["cp-deploy", "batch", "--resume", "again"])
    assert main(["batch", "--input", str(out.parent / "in"), "--output", str(out), "--bundle",
                 str(tiny_bundle.root), "--overlays", "--no-progress", "--prompts", "box", "--resume"]) == 0
    again = json.loads((out / "run.json").read_text())
    assert again["settings"] == info["settings"]
    assert again["provenance"]["command"] == ["cp-deploy", "batch", "--resume", "again"]
    assert again["provenance"]["resumed"] is True


def _colour_pixels(uri: str, rgb: tuple[int, int, int]) -> int:
    """Pixels near ``rgb`` in an embedded JPEG (JPEG blurs colours, so near by a margin)."""
    data = base64.b64decode(uri.split(",", 1)[1])
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(int)
    return int((np.abs(bgr[..., ::-1] - np.array(rgb)).max(-1) < 100).sum())


def test_report_shows_provenance_ground_truth_contour_and_iou(run, tiny_bundle):
    out, gt = run
    page = build_report(out, gt)
    table = page.split("<h2>What made these masks</h2>", 1)[1].split("<h2>", 1)[0]
    for text in (tiny_bundle.name, json.loads((out / "run.json").read_text())["settings"]["bundle_sha256"],
                 "torch", "cpu", "fp32", f"cp-deploy</th><td>{cp_deploy.__version__}", torch.__version__,
                 "prompts box", "command"):
        assert text in table, text
    assert "ground-truth contour" in page and "#ff00ff" in page
    ious = {name: float(v) for name, v in re.findall(r"<figcaption>([^<]+)<br>.*?IoU <b>([0-9.]+)</b>", page)}
    for i in range(2):
        name = f"img_{i:03d}.png"
        want = iou(read_mask(out / "masks" / name), read_mask(gt / name))
        assert ious[name] == pytest.approx(want, abs=1e-4)
    assert "mean IoU" in page

    with_gt = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)"', page)
    without = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)"', build_report(out))
    assert len(with_gt) == len(without) == 2
    for a, b in zip(with_gt, without):
        assert _colour_pixels(a, GROUND_TRUTH) > _colour_pixels(b, GROUND_TRUTH) + 20
    assert "ground-truth contour" not in build_report(out)


def test_report_of_a_run_without_provenance_says_so(run, tmp_path):
    out, _ = run
    info = json.loads((out / "run.json").read_text())
    info.pop("provenance")
    copy = tmp_path / "older"
    copy.mkdir()
    for name in ("results.jsonl",):
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "run.json").write_text(json.dumps(info))
    assert "records no provenance" in build_report(copy)
