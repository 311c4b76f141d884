"""Exported graph folders: every graph file (and external-data file) must match the sha256 that
manifest.json records, else the engine refuses to load, naming the file and how to re-export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cp_deploy.cli import main as deploy_main
from cp_deploy.errors import EngineError
from cp_deploy.models.weights import sha256_file
from export.cli import main as export_main
from tests.conftest import make_images

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

GRAPH_NAMES = ("encoder", "detector", "keypoints", "box", "refine")


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    """One export (weights in side files, so the ``.onnx.data`` check runs too) for every test."""
    out = tmp_path_factory.mktemp("onnx-integrity")
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--external-data", "yes",
                        "--no-parity"]) == 0
    return out


@pytest.fixture
def graphs(exported, tmp_path) -> Path:
    d = tmp_path / "graphs"
    shutil.copytree(exported, d)
    return d


def _batch(bundle, graphs: Path, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    make_images(tmp_path / "in", 1)
    code = deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(bundle.root), "--engine", "onnxruntime", "--graphs", str(graphs), "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_records_every_file_hash(exported):
    m = json.loads((exported / "manifest.json").read_text())
    for name in GRAPH_NAMES:
        g = m["graphs"][name]
        assert g["sha256"] == sha256_file(exported / g["file"])
        assert g["external_data"] and g["external_data_sha256"] == sha256_file(exported / g["external_data"])


def test_intact_graphs_load(tiny_bundle, exported):
    assert set(OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported).sessions) == set(GRAPH_NAMES)


def test_swapped_graphs_are_refused(tiny_bundle, graphs, tmp_path, capsys):
    """The box and refine decoders have the same inputs and outputs: swapped, they would run."""
    for suffix in (".onnx", ".onnx.data"):
        a, b = graphs / f"box{suffix}", graphs / f"refine{suffix}"
        tmp = graphs / "swap"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
    code, err = _batch(tiny_bundle, graphs, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cp-deploy: error: ") and "box.onnx" in err[0] and "cp-export onnx" in err[0]
    assert not (tmp_path / "o" / "masks").exists() or not list((tmp_path / "o" / "masks").iterdir())


@pytest.mark.parametrize("victim", ["detector.onnx", "encoder.onnx.data"])
def test_one_changed_byte_is_refused(tiny_bundle, graphs, tmp_path, capsys, victim):
    path = graphs / victim
    # In the middle: the weights of a graph or of its external-data file (a re-weighted graph).
    _flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(EngineError, match=re.escape(victim) + r": sha256 .* differs.*cp-export onnx"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=graphs)
    code, err = _batch(tiny_bundle, graphs, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and victim in err[0], err


@pytest.mark.parametrize("key", ["sha256", "external_data_sha256"])
def test_graph_without_recorded_hash_is_refused(tiny_bundle, graphs, key):
    m = json.loads((graphs / "manifest.json").read_text())
    del m["graphs"]["keypoints"][key]
    (graphs / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=rf"manifest\.json: no sha256 recorded for keypoints\.onnx.*{key}"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=graphs)


def test_graph_file_outside_the_folder_is_refused(tiny_bundle, graphs):
    outside = graphs.parent / "elsewhere.onnx"
    shutil.copy2(graphs / "refine.onnx", outside)
    m = json.loads((graphs / "manifest.json").read_text())
    m["graphs"]["refine"]["file"] = "../elsewhere.onnx"
    (graphs / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"graphs\.refine\.file is '\.\./elsewhere\.onnx', not a file name"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=graphs)


def test_tensorrt_engine_files_are_checked_the_same_way(tmp_path):
    """TensorRTEngine checks its folder with the same function (TensorRT itself is not needed)."""
    from cp_deploy.engines.manifest import check_graph_files  # imported here: a missing one fails only this test

    files = {}
    for name in GRAPH_NAMES:
        (tmp_path / f"{name}.engine").write_bytes(name.encode() * 10)
        files[name] = {"file": f"{name}.engine", "external_data": None,
                       "sha256": sha256_file(tmp_path / f"{name}.engine")}
    manifest = {"graphs": files}
    assert check_graph_files(manifest, tmp_path, "rebuild")["box"] == tmp_path / "box.engine"
    (tmp_path / "box.engine").write_bytes((tmp_path / "refine.engine").read_bytes())
    with pytest.raises(EngineError, match=r"box\.engine: sha256 .* differs.*; rebuild"):
        check_graph_files(manifest, tmp_path, "rebuild")
