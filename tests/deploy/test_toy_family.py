"""A detector family defined in this one file, registered at import, runs everywhere a built-in one
does: built from a bundle, decoded by the pipeline, exported to ONNX with parity, and served by
``cp-deploy batch`` on the torch and onnxruntime engines. No other module names it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cp_deploy.models.build import build_models, init_bundle
from cp_deploy.models.registry import BuildContext, DetectorFamily, detector_family, from_config, register
from tests.conftest import batch_on_torch_and_onnxruntime, make_images

TOY_STRIDE = 8
TOY_SIZE = 64


class ToyDetector(nn.Module):
    """Two strided convolutions on the image; per cell of 8 pixels an objectness logit and a box
    (centre offset and log size, in cells). Its outputs are its own, not CenterNet's."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=4, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.objectness = nn.Conv2d(width, 1, 1)
        self.box = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        h, w = f.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        cells = torch.stack([xs, ys]).flatten(1).to(x.device)  # 2 x HW
        b = self.box(f).flatten(2)  # B x 4 x HW
        centre = (cells + 0.5 + torch.tanh(b[:, :2])) * TOY_STRIDE
        half = torch.exp(b[:, 2:].clamp(-4, 4)) * TOY_STRIDE / 2
        boxes = torch.cat([centre - half, centre + half], 1).transpose(1, 2)  # B x HW x 4, input pixels
        return {"objectness": self.objectness(f).flatten(1), "boxes": boxes}


def toy_decode(raw: dict[str, torch.Tensor], config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    scores = torch.sigmoid(raw["objectness"].float())
    top, idx = scores.topk(min(int(config.get("max_candidates", 10)), scores.shape[1]), dim=1)
    return [(raw["boxes"][i].float()[idx[i]], top[i]) for i in range(len(scores))]


def toy_loss(net: nn.Module, inputs: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """Objectness BCE (the cell holding a box's centre is positive) plus L1 on that cell's box."""
    raw = net(inputs)
    target = torch.zeros_like(raw["objectness"])
    l1 = raw["boxes"].new_zeros(())
    side = inputs.shape[-1] // TOY_STRIDE
    for i, b in enumerate(boxes):
        for box in b.to(raw["boxes"]):
            cx, cy = ((box[:2] + box[2:]) / 2 / TOY_STRIDE).long().clamp(0, side - 1).tolist()
            target[i, cy * side + cx] = 1.0
            l1 = l1 + F.l1_loss(raw["boxes"][i, cy * side + cx], box) / TOY_STRIDE
    return F.binary_cross_entropy_with_logits(raw["objectness"], target) + l1 / max(1, sum(len(b) for b in boxes))


TOY = register(DetectorFamily(
    name="toy_boxes",
    reads="image",
    output_names=("objectness", "boxes"),
    build=from_config(ToyDetector),
    decode=toy_decode,
    loss=toy_loss,
    default_config=lambda width=8, **_: {"width": width},
))


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    return init_bundle(tmp_path_factory.mktemp("toy"), "tiny", seed=0, detector=("toy_boxes", TOY.default_config()),
                       detector_size=TOY_SIZE, prompt={"score_threshold": 0.0, "max_instances": 2})


def test_the_family_builds_decodes_and_trains(toy_bundle):
    assert detector_family("toy_boxes") is TOY
    entry = json.loads((toy_bundle.root / "bundle.json").read_text())["detector"]
    assert (entry["arch"], entry["reads"], entry["preprocess"]["image_size"]) == ("toy_boxes", "image", TOY_SIZE)
    net = build_models(toy_bundle).detector
    assert isinstance(net, ToyDetector)
    x = torch.randn(2, 3, TOY_SIZE, TOY_SIZE)
    with torch.no_grad():
        (b0, s0), (b1, s1) = TOY.decode(net(x), {})
    assert b0.shape == (10, 4) and (s0[:-1] >= s0[1:]).all()
    fresh = TOY.build(TOY.default_config(), BuildContext())
    loss = TOY.loss(fresh, x, [torch.tensor([[8.0, 8.0, 40.0, 30.0]]), torch.zeros(0, 4)])
    loss.backward()
    assert loss.ndim == 0 and fresh.box.weight.grad.abs().sum() > 0


pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")


def test_the_family_exports_and_runs_on_both_engines(toy_bundle, tmp_path):
    from export.cli import main as export_main

    graphs = tmp_path / "onnx"
    assert export_main(["onnx", "--bundle", str(toy_bundle.root), "--out", str(graphs)]) == 0
    m = json.loads((graphs / "manifest.json").read_text())
    assert [t["name"] for t in m["graphs"]["detector"]["outputs"]] == ["objectness", "boxes"]
    assert m["parity"]["passed"], m["parity"]["failures"]
    out_t, _ = batch_on_torch_and_onnxruntime(toy_bundle, graphs, tmp_path, 2)
    rows = [json.loads(r) for r in (out_t / "results.jsonl").read_text().splitlines()]
    assert [len(r["instances"]) for r in rows] == [2, 2]  # threshold 0: the toy's top two boxes


def test_cp_train_trains_the_family_and_its_bundle_exports_and_runs(dataset, toy_bundle, tmp_path):
    """``cp-train detector --detector-arch toy_boxes`` trains the family through its own loss (the
    flag's choices come from the registry), and the bundle it writes exports and runs."""
    import torch

    from cp_deploy.bundle import load_bundle
    from cp_deploy.cli import main as deploy_main
    from cp_train.cli import main as train_main
    from export.cli import main as export_main

    torch.manual_seed(0)  # a fresh net's initial weights come from the global generator: fix it for this test
    out = tmp_path / "trained"
    assert train_main(["detector", "--detector-arch", "toy_boxes", "--data", str(dataset), "--split",
                       str(dataset / "train.txt"), "--out", str(out), "--base", str(toy_bundle.root),
                       "--val-fraction", "0.25", "--val-metric", "boxes", "--detector-size", str(TOY_SIZE),
                       "--epochs", "2", "--batch-size", "3", "--lr", "1e-2", "--no-progress"]) == 0
    losses = [json.loads(r)["loss"] for r in (tmp_path / "trained-work" / "detector" / "log.jsonl").read_text()
              .splitlines()]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    trained = load_bundle(out)
    assert (trained.detector.arch, trained.detector.config) == ("toy_boxes", TOY.default_config())
    assert trained.detector.file is not None and trained.detector.sha256 != toy_bundle.detector.sha256
    graphs = tmp_path / "onnx"
    assert export_main(["onnx", "--bundle", str(out), "--out", str(graphs)]) == 0  # parity checked there
    make_images(tmp_path / "in", 2)
    assert deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(out), "--engine", "onnxruntime", "--graphs", str(graphs), "--no-progress"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    p = trained.prompt  # tuned on validation by cp-train
    assert len(rows) == 2 and all(p.min_instances <= len(r["instances"]) <= p.max_instances for r in rows)
