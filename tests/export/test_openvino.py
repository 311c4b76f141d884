"""--engine openvino: the ONNX graphs on OpenVINO's CPU plugin, against torch and ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from cp_deploy.cli import main as deploy_main
from cp_deploy.errors import EngineError, MissingExtraError
from cp_deploy.files import read_mask
from cp_deploy.metrics import dice
from export.cli import main as export_main
from tests.conftest import make_images, without_module

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from cp_deploy.engines.openvino import OpenVINOEngine  # noqa: E402


def _needs_openvino():
    pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out)]) == 0
    return out


def _assert_rel_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= rel * scale


@pytest.mark.parametrize("batch,instances,points", [(1, 1, 1), (2, 3, 2), (3, 5, 9)])
def test_raw_outputs_match_onnxruntime(tiny_bundle, exported, batch, instances, points):
    """Every graph at several batch / instance / point counts (dynamic axes), outputs in the
    manifest's order, within 1e-4 of ONNX Runtime relative to the output's scale."""
    _needs_openvino()
    ov, ort = OpenVINOEngine(tiny_bundle, onnx_dir=exported), OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported)
    g = torch.Generator().manual_seed(batch)
    size = ov.manifest["graphs"]["encoder"]["inputs"][0].shape[-1]
    images = torch.randn(batch, 3, size, size, generator=g)
    emb = ort.encode(images)
    _assert_rel_close(ov.encode(images), emb)
    det_in = ov.manifest["graphs"]["detector"]["inputs"][0]
    det_x = images if det_in.shape[-1] == size else emb
    d_ov, d_ort = ov.detect(det_x), ort.detect(det_x)
    assert list(d_ov) == [t.name for t in ov.manifest["graphs"]["detector"]["outputs"]]
    for k in d_ort:
        _assert_rel_close(d_ov[k], d_ort[k])
    rois = torch.tensor([[i % batch, 5.0 + i, 10.0, 60.0 + i, 90.0] for i in range(instances)])
    kp_in = ov.manifest["graphs"]["keypoints"]["inputs"][0]
    kp_x = images if kp_in.shape[-1] == size else emb
    _assert_rel_close(ov.keypoints(kp_x, rois), ort.keypoints(kp_x, rois))
    inst = emb[torch.arange(instances) % batch]
    pts = (torch.rand(instances, points, 2, generator=g) * size, torch.ones(instances, points, dtype=torch.long))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0]]).expand(instances, 4)
    mask_in = torch.randn(instances, 1, *ov.mask_size, generator=g)
    for head, kw in (("box", {"boxes": boxes}), ("refine", {"points": pts, "mask_input": mask_in}),
                     ("refine", {"points": pts, "boxes": boxes})):
        for a, b in zip(ov.decode(head, inst, **kw), ort.decode(head, inst, **kw)):
            _assert_rel_close(a, b)


def test_cli_batch_with_openvino_matches_torch(tiny_bundle, exported, tmp_path):
    """cp-deploy batch --engine openvino: per image Dice >= 0.99 against the torch engine's masks."""
    _needs_openvino()
    make_images(tmp_path / "in", 4)
    common = ["batch", "--input", str(tmp_path / "in"), "--bundle", str(tiny_bundle.root), "--no-progress"]
    assert deploy_main([*common, "--output", str(tmp_path / "t")]) == 0
    assert deploy_main([*common, "--output", str(tmp_path / "v"), "--engine", "openvino", "--graphs", str(exported),
                        "--threads", "1"]) == 0
    masks = sorted((tmp_path / "t" / "masks").glob("*.png"))
    assert len(masks) == 4
    for p in masks:
        a, b = read_mask(p), read_mask(tmp_path / "v" / "masks" / p.name)
        assert (a == b).mean() > 0.999
        if a.any():
            assert dice(b, a) >= 0.99


def test_manifest_checks_are_onnxruntimes(tiny_bundle, exported, tmp_path):
    """The same refusals as ONNX Runtime: edited graphs, other weights, failed parity, no folder."""
    _needs_openvino()
    with pytest.raises(EngineError, match="manifest.json is missing.*cp-export onnx --bundle"):
        OpenVINOEngine(tiny_bundle, onnx_dir=tmp_path / "nothing")
    d = tmp_path / "graphs"
    shutil.copytree(exported, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "parity": {"passed": False, "failures": ["box: off"]}}))
    with pytest.raises(EngineError, match="failed the parity check"):
        OpenVINOEngine(tiny_bundle, onnx_dir=d)
    (d / "manifest.json").write_text(json.dumps({**m, "sources": {**m["sources"], "refine": "0" * 64}}))
    with pytest.raises(EngineError, match=r"other weights.*refine differ"):
        OpenVINOEngine(tiny_bundle, onnx_dir=d)
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "box.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EngineError, match=r"box\.onnx: sha256 .* differs.*cp-export onnx"):
        OpenVINOEngine(tiny_bundle, onnx_dir=d)


def test_cuda_is_refused_in_one_line(tiny_bundle, exported, tmp_path, capsys):
    with pytest.raises(EngineError, match="CPU only.*onnxruntime or trt"):
        OpenVINOEngine(tiny_bundle, device="cuda", onnx_dir=exported)
    make_images(tmp_path / "in", 1)
    code = deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(tiny_bundle.root), "--engine", "openvino", "--device", "cuda", "--graphs", str(exported),
                        "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "onnxruntime or trt" in err[0]


def test_missing_extra_names_it(tiny_bundle, exported, tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    without_module(monkeypatch, "openvino")
    with pytest.raises(MissingExtraError, match=r"curriculum-prompting\[openvino\]"):
        OpenVINOEngine(tiny_bundle, onnx_dir=exported)
    make_images(tmp_path / "in", 1)
    code = deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(tiny_bundle.root), "--engine", "openvino", "--graphs", str(exported), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "curriculum-prompting[openvino]" in err[0]


def test_one_compiled_model_per_shape_then_the_dynamic_one(tiny_bundle, exported, monkeypatch):
    """Each new input shape of a graph gets its own static compile, up to SHAPES_PER_GRAPH; past
    that, calls run on the dynamic model. Both give ONNX Runtime's outputs."""
    _needs_openvino()
    from cp_deploy.engines import openvino

    monkeypatch.setattr(openvino, "SHAPES_PER_GRAPH", 2)
    ov, ort = OpenVINOEngine(tiny_bundle, onnx_dir=exported), OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported)
    size = ov.manifest["graphs"]["encoder"]["inputs"][0].shape[-1]
    for batch in (1, 2, 1, 3):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        _assert_rel_close(ov.encode(images), ort.encode(images))
    assert sorted(shapes[0][0] for g, shapes in ov._static if g == "encoder") == [1, 2]


def test_shapes_tool_times_both_requests_on_recorded_feeds(tiny_bundle, exported, tmp_path):
    """tools.openvino_shapes records a real pipeline call's feeds and times the dynamic and the
    static request of each graph it called; the engine's run is its own again afterwards."""
    _needs_openvino()
    from tools.openvino_shapes import main as shapes_main

    image = make_images(tmp_path / "in", 1)[0]
    out = tmp_path / "shapes.json"
    result = shapes_main(["--graphs", str(exported), "--bundle", str(tiny_bundle.root), "--image", str(image),
                          "--rounds", "1", "--json", str(out)])
    assert {"encoder", "detector"} <= set(result) and json.loads(out.read_text()) == result
    for row in result.values():
        assert row["dynamic"] > 0 and row["static"] > 0 and all(0 not in s for s in row["shapes"].values())
    assert result["encoder"]["shapes"]["images"][0] == 1


def test_speed_json_names_the_graphs_and_their_precisions(tiny_bundle, exported, tmp_path):
    """cp-bench speed on a graph engine records the folder it ran and each graph's precision."""
    _needs_openvino()
    from cp_bench.cli import main as bench_main

    make_images(tmp_path / "in", 2)
    for flags in ([], ["--end-to-end"]):
        out = tmp_path / "speed.json"
        assert bench_main(["speed", "--bundle", str(tiny_bundle.root), "--engine", "openvino", "--graphs",
                           str(exported), "--image-dir", str(tmp_path / "in"), "--images", "2", *flags,
                           "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["graphs"] == str(exported) and r["graph_precisions"] == dict.fromkeys(
            ["encoder", "detector", "keypoints", "box", "refine"], "fp32")
