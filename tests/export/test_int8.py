"""cp-export onnx --precision int8: graphs quantised one by one, kept only where the gate holds."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cp_deploy.engines.torch import TorchEngine
from cp_deploy.errors import EngineError
from cp_deploy.models.weights import sha256_file
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export.cli import main as export_main
from export.gate import Gate, GateImages, judge
from export.parity import Tolerance, synthetic_images
from tests.conftest import make_images

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from cp_deploy.engines.openvino import OpenVINOEngine  # noqa: E402

GRAPHS = ("encoder", "detector", "keypoints", "box", "refine")


def _export(bundle, tmp: Path, *extra: str) -> tuple[int, Path]:
    make_images(tmp / "calib", 3, seed=1)
    out = tmp / "out"
    code = export_main(["onnx", "--bundle", str(bundle.root), "--out", str(out), "--precision", "int8",
                        "--calib-images", str(tmp / "calib"), *extra])
    return code, out


@pytest.fixture(scope="module")
def int8_folder(tiny_bundle, dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    (tmp / "val.txt").write_text("\n".join((dataset / "train.txt").read_text().split()[:6]) + "\n")
    make_images(tmp / "parity", 4, seed=3, sizes=((120, 160), (150, 110)))
    code, out = _export(tiny_bundle, tmp, "--val-data", str(dataset), "--val-split", str(tmp / "val.txt"),
                        "--images", str(tmp / "parity"))
    assert code == 0
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_manifest_records_each_graphs_precision_and_gate(int8_folder):
    """Every graph says the precision it runs in; kept int8 graphs are QDQ graphs that passed the
    gate; the folder holds exactly the files the manifest hashes."""
    import onnx

    m = _manifest(int8_folder)
    assert m["parity"]["passed"] and m["int8"]["validation"]["images"] == 6
    kept = [g for g in GRAPHS if m["graphs"][g]["precision"] == "int8"]
    assert kept, "the tiny bundle's box decoder holds in int8 (min Dice 0.9999)"
    assert m["precision"] == "int8" and m["int8"]["kept"] == kept
    named = {"manifest.json"}
    for g in GRAPHS:
        entry = m["graphs"][g]
        named.add(entry["file"])
        assert sha256_file(int8_folder / entry["file"]) == entry["sha256"]
        gate = entry["int8"]
        assert 0 <= gate["dice_min"] <= gate["dice_mean"] <= 1 and "val_mdice_fp32" in gate
        assert gate["worst_image"].startswith("img_") and gate["val_worst_image"].startswith("s")
        if g in kept:
            assert entry["file"] == f"{g}.int8.onnx" and "reason" not in gate and gate["dice_min"] >= 0.98
            assert gate["val_mdice_fp32"] - gate["val_mdice"] <= 0.005
            ops = {n.op_type for n in onnx.load(str(int8_folder / entry["file"])).graph.node}
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        else:
            assert entry["file"] == f"{g}.onnx" and gate["reason"]
    assert {p.name for p in int8_folder.iterdir()} == named
    # int8 logits are unbounded in the final check; the other graphs keep fp32's 1e-3.
    tol = Tolerance.for_manifest(m)
    assert set(tol.unbounded) == set(kept) and tol.rel == 1e-3 and tol.dice == 0.98


def test_a_graph_that_fails_the_gate_stays_fp32_with_the_reason(tiny_bundle, tmp_path):
    """An impossible per-image Dice: every int8 graph is refused, the folder is the fp32 export,
    and each graph's measured reason is recorded."""
    code, out = _export(tiny_bundle, tmp_path, "--int8-min-dice", "1.01", "--no-parity")
    assert code == 0
    m = _manifest(out)
    assert m["precision"] == "fp32" and m["int8"]["kept"] == [] and Tolerance.for_manifest(m) == Tolerance()
    for g in GRAPHS:
        entry = m["graphs"][g]
        assert entry["precision"] == "fp32" and entry["file"] == f"{g}.onnx"
        assert entry["int8"]["reason"].startswith(f"min Dice {entry['int8']['dice_min']:.4f} < 1.01 on image ")
    assert not list(out.glob("*.int8.onnx*")) and not list(out.glob(".*"))


def test_fp32_export_over_an_int8_folder_removes_its_int8_files(tiny_bundle, int8_folder, tmp_path):
    d = tmp_path / "graphs"
    shutil.copytree(int8_folder, d)
    assert list(d.glob("*.int8.onnx"))
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(d), "--no-parity"]) == 0
    assert not list(d.glob("*.int8.onnx")) and _manifest(d)["precision"] == "fp32"
    assert sorted(p.name for p in d.iterdir()) == sorted([f"{g}.onnx" for g in GRAPHS] + ["manifest.json"])


def test_judge_gives_the_measured_reason():
    """The gate's two rules on hand-made masks: per-image Dice, then the validation mDice drop."""
    ref = np.zeros((20, 20), bool)
    ref[5:15, 5:15] = True
    shrunk = ref.copy()
    shrunk[5, 5:15] = False  # Dice 0.947 against ref
    images = GateImages(["a", "b"], [], ["v"], [], [ref])
    v = judge([ref, ref], [ref, shrunk], images, Gate(), [ref], [ref])
    assert v.reason == "min Dice 0.9474 < 0.98 on image b" and v.worst_image == "b"
    # Parity images equal; validation mDice 0.053 lower: refused by the second rule, and the
    # validation image's own Dice (0.947) is reported, not a rule.
    v = judge([ref, ref], [ref, ref], images, Gate(), [ref], [shrunk])
    assert v.reason.startswith("validation mDice 0.9474 is 0.0526 below fp32's 1.0000")
    assert v.dice_min == 1.0 and v.val_dice_min == pytest.approx(0.9474, abs=1e-4) and v.val_worst_image == "v"
    assert judge([ref, ref], [ref, ref], images, Gate(), [ref], [ref]).reason is None


@pytest.mark.parametrize("flags,needle", [
    ([], "--precision int8 needs --calib-images DIR"),
    (["--calib-images", "x", "--val-data", "x"], "--val-data and --val-split go together"),
])
def test_int8_flag_errors_are_one_line_exit_2(tiny_bundle, tmp_path, capsys, flags, needle):
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path), "--precision", "int8",
                        *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path), "--calib-images", "x"])
    assert code == 2 and "for --precision int8 or --nncf-int8 only" in capsys.readouterr().err


def test_a_calibration_folder_without_images_fails_before_the_export(tiny_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "o"), "--precision", "int8",
                        "--calib-images", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no images to calibrate on" in err[0] and not (tmp_path / "o").exists()


def test_missing_onnxruntime_names_the_extra(tiny_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "o"), "--precision", "int8",
                        "--calib-images", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "curriculum-prompting[onnx]" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engines_run_the_mixed_folder(tiny_bundle, int8_folder, engine):
    """ONNX Runtime and OpenVINO load the mixed folder and give masks near torch's."""
    if engine == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")
    cls = OpenVINOEngine if engine == "openvino" else OnnxRuntimeEngine
    images = synthetic_images(3, seed=5)
    opts = PipelineOptions(prompts="curriculum")
    ref = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle), opts).predict(images)
    got = CurriculumPipeline(tiny_bundle, cls(tiny_bundle, onnx_dir=int8_folder), opts).predict(images)
    assert sum(len(r.boxes) for r in ref) >= 2
    for r, g in zip(ref, got):
        assert g.mask.shape == r.mask.shape and len(g.boxes) == len(r.boxes)
        assert (g.mask == r.mask).mean() > 0.97


def test_openvino_runs_the_int8_graphs_in_int8(tiny_bundle, int8_folder):
    """OpenVINO's f32 precision hint (engines/openvino.py) still runs QDQ graphs on int8 kernels:
    the compiled model's convolutions and fully connected layers of each kept graph run in u8/i8,
    those of the fp32 graphs in f32."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")
    engine = OpenVINOEngine(tiny_bundle, onnx_dir=int8_folder)
    m = engine.manifest
    for g in GRAPHS:
        precisions = set()
        for op in engine.models[g].get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
                precisions.add(info["runtimePrecision"].astype(str))
        int8 = bool(precisions & {"u8", "i8"})
        assert int8 == (m["graphs"][g]["precision"] == "int8"), (g, precisions)


def test_trt_refuses_int8_graphs(int8_folder, tmp_path, capsys):
    assert export_main(["trt", "--onnx", str(int8_folder), "--out", str(tmp_path / "trt")]) == 2
    assert "these are int8" in capsys.readouterr().err and not (tmp_path / "trt").exists()


def test_sha256_check_covers_the_int8_files(tiny_bundle, int8_folder, tmp_path):
    d = tmp_path / "graphs"
    shutil.copytree(int8_folder, d)
    kept = _manifest(d)["int8"]["kept"][0]
    (d / f"{kept}.int8.onnx").write_bytes(b"not a graph")
    with pytest.raises(EngineError, match=rf"{kept}\.int8\.onnx: sha256 .* differs"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)
