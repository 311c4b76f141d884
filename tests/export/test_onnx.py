"""cp-export onnx and the onnxruntime engine: graphs, manifest, parity, and every bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cp_deploy.cli import main as deploy_main
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.errors import EngineError
from cp_deploy.models.sam import PromptHead, build_sam, labelled_prompts
from cp_deploy.models.weights import sha256_file
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export.cli import main as export_main
from export.parity import Tolerance, check_parity, synthetic_images
from tests.conftest import batch_on_torch_and_onnxruntime, make_images

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")

from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROMPTS = ("box", "points", "box+points", "box+mask", "curriculum")


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kw", [
    {"boxes": True}, {"points": True}, {"points": True, "mask": True}, {"points": True, "boxes": True},
    {"boxes": True, "mask": True},
])
def test_labelled_prompts_equal_the_prompt_encoder(kw):
    """SAM's ONNX prompt form (labels -1/0/1/2/3, has_mask_input) gives the same logits as
    PromptEncoder's own arguments, padding point included."""
    torch.manual_seed(0)
    head = PromptHead.from_sam(build_sam("tiny")).eval()
    n = 3
    emb = torch.randn(n, 32, 8, 8)
    args = {}
    if kw.get("points"):
        args["points"] = (torch.rand(n, 8, 2) * 128, torch.zeros(n, 8, dtype=torch.long))
    if kw.get("boxes"):
        args["boxes"] = torch.tensor([[10.0, 20.0, 60.0, 90.0]]).expand(n, 4)
    if kw.get("mask"):
        args["mask_input"] = torch.randn(n, 1, 32, 32)
    with torch.no_grad():
        ref = head(emb, **args)
        got = head.forward_labelled(emb, **labelled_prompts(n, head.mask_input_size, **args))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


def test_export_writes_graphs_and_manifest(tiny_bundle, exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["opset"] == 17 and set(m["graphs"]) == {"encoder", "detector", "keypoints", "box", "refine"}
    for g in m["graphs"].values():
        assert (exported / g["file"]).is_file()
    box = {t["name"]: t["shape"] for t in m["graphs"]["box"]["inputs"]}
    assert box["point_coords"][:2] == ["instances", "points"] and box["has_mask_input"] == ["instances"]
    assert m["graphs"]["encoder"]["inputs"][0]["shape"][0] == "batch"
    assert m["sources"]["box"] == tiny_bundle.box_head.sha256
    assert m["parity"]["passed"] and m["parity"]["masks"]["dice_min"] >= 0.99
    # Traced at batch 2 / 3 instances; the random check ran 3 images and 5 instances of 10 points.
    assert all(d["random"] <= 1e-3 * max(1, m["parity"]["scale"][g]) for g, d in m["parity"]["graphs"].items())


@pytest.mark.parametrize("prompts", PROMPTS)
def test_onnxruntime_pipeline_equals_torch(tiny_bundle, exported, prompts):
    images = synthetic_images(3, seed=2) + [np.random.default_rng(0).integers(0, 255, (77, 131, 3), np.uint8)]
    opts = PipelineOptions(prompts=prompts)
    ref = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle), opts).predict(images)
    got = CurriculumPipeline(tiny_bundle, OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported), opts).predict(images)
    assert sum(len(r.boxes) for r in ref) >= 2, "the tiny detector should yield instances"
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.boxes, r.boxes, atol=1e-3)
        np.testing.assert_allclose(g.low_res_logits, r.low_res_logits, atol=1e-3)
        assert (g.mask == r.mask).mean() > 0.999


def test_onnxruntime_threads_do_not_spin(tiny_bundle, exported):
    """Every session turns off the intra-op threads' spinning (engines/onnxruntime.py has the
    measurement), with or without --threads."""
    for threads in (0, 2):
        engine = OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported, threads=threads)
        for session in engine.sessions.values():
            opts = session.get_session_options()
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_parity_check_fails_on_a_wrong_engine(tiny_bundle, exported):
    """The check is not vacuous: an engine whose refine logits are off by 0.5 fails it."""

    class Skewed(OnnxRuntimeEngine):
        def decode(self, head, embeddings, **kw):
            logits, iou = super().decode(head, embeddings, **kw)
            return (logits + 0.5 if head == "refine" else logits), iou

    engine = Skewed(tiny_bundle, onnx_dir=exported)
    torch_engine = TorchEngine(tiny_bundle)
    rep = check_parity(tiny_bundle, torch_engine.models, torch_engine, engine, synthetic_images(3), Tolerance())
    assert any(f.startswith("refine (real inputs)") for f in rep.failures)
    assert "box" not in rep.failures[0]


def test_external_data_graphs_load(tiny_bundle, tmp_path):
    """The ViT-H path (weights in side files), forced on the tiny bundle."""
    out = tmp_path / "ext"
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--external-data", "yes",
                        "--no-parity"]) == 0
    assert (out / "encoder.onnx.data").stat().st_size > (out / "encoder.onnx").stat().st_size
    engine = OnnxRuntimeEngine(tiny_bundle, onnx_dir=out)
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(engine.encode(x), TorchEngine(tiny_bundle).encode(x), atol=1e-4, rtol=1e-4)


def test_cli_batch_with_onnxruntime_matches_torch(tiny_bundle, exported, tmp_path):
    batch_on_torch_and_onnxruntime(tiny_bundle, exported, tmp_path, 4)


def _copy(exported: Path, tmp_path: Path) -> Path:
    d = tmp_path / "graphs"
    shutil.copytree(exported, d)
    return d


def test_corrupt_graph_names_file_and_fix(tiny_bundle, exported, tmp_path, capsys):
    d = _copy(exported, tmp_path)
    (d / "refine.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EngineError, match=r"refine\.onnx: sha256 .* differs.*cp-export onnx"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)
    # A broken graph whose hash is recorded (a bad export) fails in ONNX Runtime, as clearly.
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"]["refine"]["sha256"] = sha256_file(d / "refine.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"refine\.onnx: cannot load the ONNX graph.*cp-export onnx"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)
    make_images(tmp_path / "in", 1)
    code = deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(tiny_bundle.root), "--engine", "onnxruntime", "--graphs", str(d), "--no-progress"])
    assert code == 2 and "refine.onnx" in capsys.readouterr().err


def test_missing_graphs_say_how_to_export(tiny_bundle, tmp_path):
    with pytest.raises(EngineError, match="manifest.json is missing.*cp-export onnx --bundle"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=tmp_path / "nothing")


def test_graphs_of_other_weights_are_refused(tiny_bundle, exported, tmp_path):
    d = _copy(exported, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["sources"]["refine"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"other weights.*refine differ"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)


def test_graphs_that_failed_parity_are_refused(tiny_bundle, exported, tmp_path):
    d = _copy(exported, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["parity"] = {"passed": False, "failures": ["box (real inputs): max abs diff 1 > 0.001"]}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="failed the parity check"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=d)


def test_missing_runtimes_name_their_extra(tiny_bundle, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EngineError, match=r"curriculum-prompting\[onnx\]"):
        OnnxRuntimeEngine(tiny_bundle, onnx_dir=exported)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from cp_deploy.engines.trt import TensorRTEngine

    with pytest.raises(EngineError, match=r"curriculum-prompting\[trt\]"):
        TensorRTEngine(tiny_bundle, engine_dir=exported)


def test_cuda_without_onnxruntime_gpu_is_a_clear_error(tiny_bundle, exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; the error is for CPU-only onnxruntime")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        OnnxRuntimeEngine(tiny_bundle, device="cuda", onnx_dir=exported)


def test_default_bundle_export_and_examples(tmp_path):
    """End to end on the shipped bundle and the real example polyps:
    cp-export onnx (with its parity check on them), then cp-deploy batch --engine onnxruntime,
    and --engine openvino where its extra is installed (two model workers, the CPU default),
    give the torch engine's masks."""
    from cp_deploy.bundle import load_bundle
    from cp_deploy.files import read_mask
    from cp_deploy.metrics import dice

    out = tmp_path / "onnx"
    assert export_main(["onnx", "--out", str(out), "--images", str(EXAMPLES / "images")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["masks"]["images"] == 5
    bundle = load_bundle()
    images = str(EXAMPLES / "images")
    assert deploy_main(["batch", "--input", images, "--output", str(tmp_path / "ort"), "--engine", "onnxruntime",
                        "--graphs", str(out), "--no-progress"]) == 0
    engine = TorchEngine(bundle)
    from cp_deploy.executors.local import run_folder

    run_folder(CurriculumPipeline(bundle, engine), images, tmp_path / "torch", progress=False)
    engines = ["ort"]
    try:
        import openvino  # noqa: F401
    except ImportError:  # the openvino extra is optional; the ONNX Runtime check still runs
        pass
    else:
        engines.append("openvino")
        assert deploy_main(["batch", "--input", images, "--output", str(tmp_path / "openvino"), "--engine", "openvino",
                            "--graphs", str(out), "--model-workers", "2", "--no-progress"]) == 0
    masks = sorted((tmp_path / "torch" / "masks").glob("*.png"))
    assert len(masks) == 5
    for name in engines:
        for p in masks:
            a, b = read_mask(p), read_mask(tmp_path / name / "masks" / p.name)
            assert (a == b).mean() > 0.999 and dice(b, a) > 0.99, (name, p.name)


def test_fp16_graphs_keep_normalisation_in_fp32(tiny_bundle, tmp_path):
    """fp16 export: weights in fp16, every Softmax and LayerNormalization computed in fp32
    (SAM's LayerNorm overflows in fp16), fp32 inputs and outputs; parity holds at fp16 bounds."""
    import onnx

    out = tmp_path / "fp16"
    assert export_main(["onnx", "--bundle", str(tiny_bundle.root), "--out", str(out), "--precision", "fp16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    for graph in ("encoder", "box"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(out / f"{graph}.onnx")))
        types = {v.name: v.type.tensor_type.elem_type for v in
                 [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        norm = [n for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization")]
        assert norm, f"{graph} has no softmax or LayerNorm to check"
        for n in norm:
            assert types[n.input[0]] == onnx.TensorProto.FLOAT, f"{graph}: {n.name} runs in fp16"
        weights = [t.data_type for t in model.graph.initializer if len(t.dims) >= 2]
        assert weights.count(onnx.TensorProto.FLOAT16) > len(weights) // 2
        assert all(types[t.name] == onnx.TensorProto.FLOAT for t in [*model.graph.input, *model.graph.output])
