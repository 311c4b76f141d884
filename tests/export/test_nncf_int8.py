"""cp-export onnx --precision bf16 --nncf-int8 GRAPH: NNCF's int8 graphs on OpenVINO, gated like bf16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cp_deploy.engines.manifest import GRAPHS, OPENVINO_IR
from cp_deploy.errors import EngineError, MissingExtraError
from cp_deploy.models.weights import sha256_file
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export import cli
from export.cli import main as export_main
from export.gate import Gate, GateImages
from export.onnx import write_manifest
from export.parity import synthetic_images
from tests.conftest import make_images, without_module

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")
pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")
pytest.importorskip("nncf", reason="the nncf extra is not installed: pip install '.[nncf]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from cp_deploy.engines.openvino import OpenVINOEngine, cpu_has_bf16  # noqa: E402
from export.nncf_int8 import import_nncf, nncf_folder  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16 or "
                                "AMX), so a bf16 export, and --nncf-int8 with it, is refused here")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nncf-images")
    make_images(tmp / "calib", 4, seed=1)
    make_images(tmp / "parity", 3, seed=3, sizes=((120, 160), (150, 110)))
    return tmp


@pytest.fixture(scope="module")
def bf16_int8_folder(tiny_bundle, images, tmp_path_factory) -> Path:
    """The encoder in NNCF int8, the rest bf16; the random tiny bundle's int8 masks are far from
    fp32's, so the gate and the parity check are opened here (the refusal has its own test)."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX512-BF16 or AMX); a bf16 export is refused here")
    out = tmp_path_factory.mktemp("nncf") / "out"
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--precision", "bf16",
                        "--nncf-int8", "encoder", "--calib-images", str(images / "calib"),
                        "--images", str(images / "parity"), "--gate-min-dice", "0",
                        "--min-dice", "0", "--pixel-agreement", "0"]) == 0
    return out


def test_the_cli_spells_the_graph_names_of_the_manifest():
    assert cli.GRAPH_NAMES == GRAPHS


@needs_bf16
def test_a_kept_graph_is_openvino_ir_the_manifest_hashes(bf16_int8_folder):
    m = _manifest(bf16_int8_folder)
    enc = m["graphs"]["encoder"]
    assert (enc["file"], enc["external_data"], enc["format"]) == ("encoder.int8.xml", "encoder.int8.bin", OPENVINO_IR)
    # The bf16 gate's verdict on the encoder decides its float ops.
    assert enc["precision"] == "int8" and enc["float_precision"] == ("fp32" if "reason" in enc["bf16"] else "bf16")
    assert sha256_file(bf16_int8_folder / enc["file"]) == enc["sha256"]
    assert sha256_file(bf16_int8_folder / enc["external_data"]) == enc["external_data_sha256"]
    assert m["int8"]["kept"] == ["encoder"] and m["int8"]["calibration"]["images"] == 4
    assert "dice_min" in m["int8"]["folder"] and "reason" not in enc["int8"]
    assert "calibration" not in m["bf16"]  # the bf16 gate calibrated nothing
    assert m["parity"]["passed"]
    # Exactly the files the manifest names: the replaced encoder.onnx and the staging folders are gone.
    named = {f for e in m["graphs"].values() for f in (e["file"], e.get("external_data")) if f}
    assert {p.name for p in bf16_int8_folder.iterdir()} == named | {"manifest.json"}


@needs_bf16
def test_openvino_runs_it_with_bf16_float_ops_and_onnxruntime_refuses_it(tiny_bundle, bf16_int8_folder, tmp_path):
    engine = OpenVINOEngine(tiny_bundle, onnx_dir=bf16_int8_folder)
    assert engine.precisions["encoder"] == "int8"
    assert engine.models["encoder"].get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    images = synthetic_images(2, seed=5)
    results = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(prompts="curriculum")).predict(images)
    assert len(results) == 2 and all(r.mask.shape == im.shape[:2] for r, im in zip(results, images))
    # The IR alone is reason enough: every graph's float ops in f32.
    folder = tmp_path / "g"
    shutil.copytree(bf16_int8_folder, folder)
    m = _manifest(folder)
    for g, entry in m["graphs"].items():
        entry.update(precision="int8" if g == "encoder" else "fp32", float_precision="fp32")
    write_manifest(folder, m)
    with pytest.raises(EngineError, match=r": encoder were exported to run on OpenVINO.*--engine openvino"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=folder)


@needs_bf16
def test_a_graph_that_fails_the_gate_stays_as_it_was(tiny_bundle, tmp_path):
    """An impossible gate (Dice above 1): nothing kept, the reasons recorded, the bf16 files untouched."""
    folder = tmp_path / "g"
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(folder), "--no-parity"]) == 0
    m = _manifest(folder)
    for g in GRAPHS:  # as the bf16 step leaves a folder where every graph held
        m["graphs"][g]["precision"] = "bf16"
    write_manifest(folder, {**m, "precision": "bf16"})
    before = _manifest(folder)
    gate_images = GateImages(["a", "b"], synthetic_images(2, seed=7))
    verdicts = nncf_folder(tiny_bundle, folder, synthetic_images(2, seed=8), ["encoder", "box"], gate_images,
                           Gate(min_dice=1.01), log=lambda s: None)
    after = _manifest(folder)
    assert set(verdicts) == {"encoder", "box"} and all(v.reason for v in verdicts.values())
    assert after["int8"]["kept"] == [] and "folder" not in after["int8"]
    for g in GRAPHS:
        entry = {k: v for k, v in after["graphs"][g].items() if k != "int8"}
        assert entry == before["graphs"][g]
    for g in ("encoder", "box"):
        gate = after["graphs"][g]["int8"]
        assert gate["reason"].startswith("min Dice") and 0 <= gate["dice_min"] <= 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{g}.onnx" for g in GRAPHS] + ["manifest.json"])


def test_flags_are_checked_before_any_export(tiny_bundle, tmp_path, capsys):
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "a"), "--precision",
                        "int8", "--calib-images", "x", "--nncf-int8", "encoder"])
    assert code == 2 and "--nncf-int8 is for --precision bf16" in capsys.readouterr().err
    code = export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "b"), "--precision",
                        "bf16", "--nncf-int8", "encoder"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--nncf-int8 needs --calib-images DIR" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_nncf_names_its_extra(monkeypatch):
    without_module(monkeypatch, "nncf")
    with pytest.raises(MissingExtraError, match=r"--nncf-int8 needs the 'nncf' extra"):
        import_nncf()
