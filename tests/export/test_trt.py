"""TensorRT: profiles everywhere; engine build, parity and bad engines where TensorRT and a GPU are."""

from __future__ import annotations

import json

import pytest
import torch

from cp_deploy.errors import EngineError
from export.trt import profile_shapes


def test_profiles_span_one_to_the_maximum():
    lo, opt, hi = profile_shapes(("instances", "points", 2), {"instances": 32, "points": 16},
                                 {"instances": 8, "points": 9})
    assert lo == (1, 1, 2) and opt == (8, 9, 2) and hi == (32, 16, 2)


def _trt_or_skip():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install '.[trt]' on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU and there is none here")


@pytest.fixture(scope="module")
def engines(tiny_bundle, tmp_path_factory):
    _trt_or_skip()
    from export.cli import main

    root = tmp_path_factory.mktemp("trt")
    assert main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(root / "onnx")]) == 0
    assert main(["trt", "--onnx", str(root / "onnx"), "--out", str(root / "trt"), "--max-batch", "2"]) == 0
    return root


def test_trt_engines_pass_parity(engines):
    m = json.loads((engines / "trt" / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["tensorrt"] and m["gpu"] == torch.cuda.get_device_name()


def test_batch_beyond_the_profile_is_refused(tiny_bundle, engines):
    from cp_deploy.engines.trt import TensorRTEngine

    engine = TensorRTEngine(tiny_bundle, engine_dir=engines / "trt")
    with pytest.raises(EngineError, match="lower --batch-size or rebuild"):
        engine.encode(torch.randn(3, 3, 128, 128, device="cuda"))


def test_engine_of_another_gpu_is_refused(tiny_bundle, engines, tmp_path):
    import shutil

    from cp_deploy.engines.trt import TensorRTEngine

    d = tmp_path / "trt"
    shutil.copytree(engines / "trt", d)
    m = json.loads((d / "manifest.json").read_text())
    m["gpu"] = "Some Other GPU"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="rebuild them with: cp-export trt"):
        TensorRTEngine(tiny_bundle, engine_dir=d)
