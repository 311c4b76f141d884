"""cp-export onnx --precision bf16: fp32 graphs that OpenVINO runs in bf16 where the gate holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cp_deploy.engines.torch import TorchEngine
from cp_deploy.errors import EngineError
from cp_deploy.executors import graph_precisions
from cp_deploy.metrics import dice
from cp_deploy.models.weights import sha256_file
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export import commands
from export.cli import main as export_main
from export.onnx import write_manifest
from export.parity import Tolerance, synthetic_images
from export.trt import build_trt
from tests.conftest import make_images

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")
pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from cp_deploy.engines.openvino import OpenVINOEngine, cpu_has_bf16  # noqa: E402

GRAPHS = ("encoder", "detector", "keypoints", "box", "refine")
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16 or "
                                "AMX), so OpenVINO runs bf16 in f32 and a bf16 export is refused (tested below)")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fp32_folder(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--no-parity"]) == 0
    return out


@pytest.fixture(scope="module")
def bf16_folder(tiny_bundle, dataset, tmp_path_factory):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX512-BF16 or AMX); a bf16 export is refused here")
    tmp = tmp_path_factory.mktemp("bf16")
    (tmp / "val.txt").write_text("\n".join((dataset / "train.txt").read_text().split()[:6]) + "\n")
    make_images(tmp / "parity", 4, seed=3, sizes=((120, 160), (150, 110)))
    out = tmp / "out"
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--precision", "bf16",
                        "--val-data", str(dataset), "--val-split", str(tmp / "val.txt"),
                        "--images", str(tmp / "parity")]) == 0
    return out


def _mark_bf16(src: Path, dst: Path, graphs: tuple[str, ...]) -> Path:
    """A copy of an fp32 folder whose manifest says ``graphs`` run in bf16 (as a bf16 export writes)."""
    shutil.copytree(src, dst)
    m = _manifest(dst)
    for g in GRAPHS:
        m["graphs"][g]["precision"] = "bf16" if g in graphs else "fp32"
    m["precision"] = "bf16"
    write_manifest(dst, m)
    return dst


@needs_bf16
def test_manifest_records_each_graphs_precision_and_gate(bf16_folder, fp32_folder):
    """Every graph says its precision and its gate figures; the files are the fp32 graphs."""
    m = _manifest(bf16_folder)
    assert m["parity"]["passed"] and m["bf16"]["validation"]["images"] == 6
    kept = [g for g in GRAPHS if m["graphs"][g]["precision"] == "bf16"]
    assert kept and m["bf16"]["kept"] == kept and m["precision"] == "bf16"
    for g in GRAPHS:
        entry, gate = m["graphs"][g], m["graphs"][g]["bf16"]
        assert entry["file"] == f"{g}.onnx" and entry["sha256"] == _manifest(fp32_folder)["graphs"][g]["sha256"]
        assert sha256_file(bf16_folder / entry["file"]) == entry["sha256"]
        assert 0 <= gate["dice_min"] <= gate["dice_mean"] <= 1 and "val_mdice_fp32" in gate
        if g in kept:
            assert "reason" not in gate and gate["dice_min"] >= 0.98
            assert gate["val_mdice_fp32"] - gate["val_mdice"] <= 0.005
        else:
            assert gate["reason"]
    assert not list(bf16_folder.glob(".*"))  # the staging folder is gone
    tol = Tolerance.for_manifest(m)
    assert set(tol.unbounded) == set(kept) and tol.dice == 0.98


@needs_bf16
def test_openvino_compiles_the_kept_graphs_in_bf16(tiny_bundle, bf16_folder):
    """Kept graphs compile with the bf16 hint and run near torch; the others stay f32."""
    engine = OpenVINOEngine(tiny_bundle, onnx_dir=bf16_folder)
    m = engine.manifest
    assert engine.precisions == {g: m["graphs"][g]["precision"] for g in GRAPHS}
    for g in GRAPHS:
        hint = engine.models[g].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        assert hint == ("bf16" if m["graphs"][g]["precision"] == "bf16" else "f32")
    images = synthetic_images(3, seed=5)
    opts = PipelineOptions(prompts="curriculum")
    ref = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle), opts).predict(images)
    got = CurriculumPipeline(tiny_bundle, engine, opts).predict(images)
    assert sum(len(r.boxes) for r in ref) >= 2
    for r, g in zip(ref, got):
        assert len(g.boxes) == len(r.boxes) and dice(g.mask, r.mask) >= 0.98


def test_a_cpu_without_bf16_is_refused_in_one_line(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Without bf16 instructions the gate would compare f32 with f32: refused before any export."""
    monkeypatch.setattr(commands, "cpu_has_bf16", lambda: False)
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "o"),
                        "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no bf16 instructions" in err[0] and "--precision int8" in err[0]
    assert not (tmp_path / "o").exists()


def test_onnxruntime_refuses_a_bf16_folder(tiny_bundle, fp32_folder, tmp_path):
    d = _mark_bf16(fp32_folder, tmp_path / "g", ("encoder",))
    with pytest.raises(EngineError, match=r"encoder were exported to run on OpenVINO.*--engine openvino"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)


def test_trt_refuses_a_bf16_folder(fp32_folder, tmp_path):
    d = _mark_bf16(fp32_folder, tmp_path / "g", ("encoder",))
    with pytest.raises(EngineError, match="these are bf16"):
        build_trt(d, tmp_path / "trt")
    assert not (tmp_path / "trt").exists()


def test_calibration_flags_are_int8_only(tiny_bundle, tmp_path, capsys):
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path), "--precision", "bf16",
                        "--calib-images", "x"])
    assert code == 2 and "--calib-images is for --precision int8 or --nncf-int8 only" in capsys.readouterr().err


def test_one_thread_models_are_not_pinned(tiny_bundle, fp32_folder):
    """Pinning would put every one-thread model worker on the same core (README "Speed")."""
    engine = OpenVINOEngine(tiny_bundle, onnx_dir=fp32_folder, threads=1)
    for g in GRAPHS:
        assert engine.models[g].get_property("ENABLE_CPU_PINNING") is False
        assert engine.models[g].get_property("INFERENCE_NUM_THREADS") == 1


def test_compiled_graphs_are_cached_by_their_sha256(tiny_bundle, fp32_folder, tmp_path):
    """One cache folder per graph file's hash: a second engine loads from it, and a graph
    exported anew (another hash) never meets the blob of the old one."""
    OpenVINOEngine(tiny_bundle, onnx_dir=fp32_folder, threads=1, cache=tmp_path)
    shas = {spec["sha256"][:16] for spec in _manifest(fp32_folder)["graphs"].values()}
    assert {p.name for p in tmp_path.iterdir()} == shas
    assert all(any((tmp_path / s).iterdir()) for s in shas)
    again = OpenVINOEngine(tiny_bundle, onnx_dir=fp32_folder, threads=1, cache=tmp_path)
    assert again.models["box"].get_property("LOADED_FROM_CACHE") is True
    assert OpenVINOEngine(tiny_bundle, onnx_dir=fp32_folder, cache=None).models["box"].get_property(
        "LOADED_FROM_CACHE") is False


def test_provenance_names_each_graphs_precision(fp32_folder, tmp_path):
    d = _mark_bf16(fp32_folder, tmp_path / "g", ("encoder", "box"))
    assert graph_precisions(d) == {"encoder": "bf16", "detector": "fp32", "keypoints": "fp32", "box": "bf16",
                                   "refine": "fp32"}
    assert graph_precisions(None) is None and graph_precisions(tmp_path / "missing") is None
