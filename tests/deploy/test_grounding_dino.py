"""The Grounding DINO detector on a tiny random config: the detector contract, the text prompt
encoded once, bad prompts and checkpoints, ONNX export with parity, and cp-deploy batch with the
torch and onnxruntime engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import GDINO_SIZE, TINY_GDINO, batch_on_torch_and_onnxruntime, make_images, write_tiny_vocab

pytest.importorskip("transformers", reason="the gdino extra is not installed: pip install '.[gdino]'")

from cp_deploy.errors import BundleError, WeightsError
from cp_deploy.models.build import build_models  # noqa: E402
from cp_deploy.models.families.grounding_dino import text_masks  # noqa: E402
from cp_deploy.models.registry import BuildContext, build_detector, decode_detections, detector_family  # noqa: E402
from cp_deploy.models.weights import load_strict, read_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


def _detector(vocab, text="polyp", **over):
    torch.manual_seed(0)
    return build_detector("grounding_dino", {"model_config": {**TINY_GDINO, **over}, "tokenizer": str(vocab)},
                          BuildContext(prompt_text=text)).eval()


def test_outputs_and_decode_follow_the_detector_contract(vocab):
    family = detector_family("grounding_dino")
    assert (family.reads, family.output_names, family.text_prompted) == ("image", ("logits", "boxes"), True)
    det = _detector(vocab, "a polyp")
    x = torch.randn(2, 3, GDINO_SIZE, GDINO_SIZE)
    with torch.no_grad():
        raw = det(x)
        # The family's training loss is transformers' set loss against per-image boxes.
        boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0]]), torch.zeros(0, 4)]
        torch.manual_seed(0)
        loss = family.loss(det, x, boxes)
        torch.manual_seed(0)
        assert torch.equal(loss, det.loss(x, boxes)) and torch.isfinite(loss)
    assert list(raw) == list(family.output_names)
    # [CLS] a polyp . [SEP]: two phrase tokens; 10 queries
    assert raw["logits"].shape == (2, 10, 2) and raw["boxes"].shape == (2, 10, 4)
    assert torch.isfinite(raw["logits"]).all()
    out = decode_detections("grounding_dino", raw, {})
    assert len(out) == 2
    for boxes, scores in out:
        assert boxes.shape == (10, 4) and scores.shape == (10,)
        assert (scores[:-1] >= scores[1:]).all() and ((scores >= 0) & (scores <= 1)).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert boxes.min() > -GDINO_SIZE and boxes.max() < 2 * GDINO_SIZE
    # The scores are the best phrase token's sigmoid for each query, boxes the query's own.
    (b0, s0), _ = out
    best = torch.sigmoid(raw["logits"][0]).amax(-1)
    torch.testing.assert_close(s0, best.sort(descending=True).values)
    torch.testing.assert_close(b0[0], raw["boxes"][0][best.argmax()])


def test_local_weights_directory_gives_transformers_own_outputs(vocab, tmp_path):
    """A Hugging Face directory loads offline, and the cached-text forward equals transformers'
    own forward that runs BERT on the prompt."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from cp_deploy.models.families.grounding_dino import load_tokenizer

    torch.manual_seed(1)
    hf = GroundingDinoForObjectDetection(GroundingDinoConfig(**TINY_GDINO)).eval()
    hf.save_pretrained(tmp_path / "gdino")
    load_tokenizer(vocab).save_pretrained(tmp_path / "gdino")
    det = build_detector("grounding_dino", {"pretrained": "gdino"}, BuildContext("Polyp", tmp_path)).eval()
    assert det.text == "polyp."
    x = torch.randn(2, 3, GDINO_SIZE, GDINO_SIZE)
    enc = load_tokenizer(vocab)(["polyp."] * 2, return_tensors="pt")
    with torch.no_grad():
        ref = hf(pixel_values=x, **enc)
        raw = det(x)
    torch.testing.assert_close(raw["logits"], ref.logits[..., 1:2], atol=1e-5, rtol=1e-5)  # [CLS] polyp . [SEP]
    cx, cy, w, h = (ref.pred_boxes * GDINO_SIZE).unbind(-1)
    torch.testing.assert_close(raw["boxes"], torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(BundleError, match="pretrained directory not found"):
        build_detector("grounding_dino", {"pretrained": "nowhere"}, BuildContext("polyp", tmp_path))


def test_text_is_encoded_once_not_per_image(vocab):
    det = _detector(vocab)
    bert = det.model.model.text_backbone.bert
    calls = []
    bert.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for b in (1, 2, 3):
            det(torch.randn(b, 3, GDINO_SIZE, GDINO_SIZE))
    assert calls == [], "BERT ran per image"
    assert det.model.model.text_backbone.encodes == 1
    # Loading weights re-encodes the prompt once, with the loaded BERT.
    other = _detector(vocab)
    with torch.no_grad():
        for p in other.model.model.text_backbone.bert.parameters():
            p.add_(0.1)
    other.encode_text()
    det.load_state_dict(other.state_dict())
    assert len(calls) == 1
    torch.testing.assert_close(det.model.model.text_backbone.features, other.model.model.text_backbone.features)


def test_text_masks_equal_transformers_own():
    """The export-friendly masks (no isin/cummax) are transformers' exactly."""
    from transformers.models.grounding_dino.modeling_grounding_dino import SPECIAL_TOKENS

    import cp_deploy.models.families.grounding_dino as gd

    original = gd._modeling()[1]._original_text_masks
    special = torch.tensor(SPECIAL_TOKENS)
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17, 40):
        for _ in range(20):
            ids = torch.tensor([101, 102, 1012, 1029, 5, 7])[torch.randint(0, 6, (3, n), generator=g)]
            ref, got = original(ids, special), text_masks(ids, special)
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_too_long_prompt_names_the_limit(vocab, gdino_bundle, tmp_path, capsys):
    import shutil

    from cp_deploy.cli import main as deploy_main

    _detector(vocab, " ".join(["polyp"] * 13))  # [CLS] + 13 + . + [SEP] = 16 tokens: the limit
    with pytest.raises(ValueError, match="17 tokens long.*max_text_len = 16"):
        _detector(vocab, " ".join(["polyp"] * 14))
    with pytest.raises(ValueError, match="no words"):
        _detector(vocab, " . ")
    bundle = tmp_path / "long"
    shutil.copytree(gdino_bundle.root, bundle)
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["prompt"]["text"] = "a polyp " * 20
    (bundle / "bundle.json").write_text(json.dumps(spec))
    make_images(tmp_path / "in", 1)
    code = deploy_main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                        str(bundle), "--no-progress"])
    assert code == 2 and "max_text_len = 16" in capsys.readouterr().err


def test_mismatching_checkpoint_lists_the_keys(vocab, tmp_path):
    from cp_deploy.models.weights import save_state_dict

    small = _detector(vocab)
    bigger = _detector(vocab, d_model=64)
    path = tmp_path / "detector.safetensors"
    save_state_dict(bigger, path)
    with pytest.raises(WeightsError, match=r"does not match the model config; shape mismatch: model\.[\w.]+: file"):
        load_strict(small, read_state_dict(path), source=str(path))
    state = small.state_dict()
    state["model.extra.weight"] = state.pop("model.bbox_embed.0.layers.0.weight")
    with pytest.raises(WeightsError, match=r"missing: model\.bbox_embed\.0\.layers\.0\.weight.*"
                                           r"unexpected: model\.extra\.weight"):
        load_strict(small, state, source="ckpt")


@pytest.fixture(scope="module")
def gdino_onnx(gdino_bundle, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install '.[onnx]'")
    from export.cli import main as export_main

    out = tmp_path_factory.mktemp("gdino_onnx")
    assert export_main(["onnx", "--bundle", str(gdino_bundle.root), "--out", str(out)]) == 0
    return out


def test_onnx_export_bakes_the_text_and_keeps_parity(gdino_bundle, gdino_onnx):
    import onnx

    m = json.loads((gdino_onnx / "manifest.json").read_text())
    det = m["graphs"]["detector"]
    assert [t["name"] for t in det["inputs"]] == ["images"]  # the text is no input: it is in the graph
    assert [t["name"] for t in det["outputs"]] == ["logits", "boxes"]
    assert m["sources"]["prompt.text"] == "polyp"
    assert m["parity"]["passed"], m["parity"]["failures"]
    d = m["parity"]["graphs"]["detector"]
    limit = 1e-3 * max(1.0, m["parity"]["scale"]["detector"])
    assert d["random"] <= limit and d["real"] <= limit
    graph = onnx.load(str(gdino_onnx / det["file"]))
    assert not any("text_backbone" in t.name for t in graph.graph.initializer), "BERT's weights were exported"


def test_grounding_dino_and_topdown_bundle_runs_on_torch_and_onnxruntime(gdino_bundle, gdino_onnx, tmp_path):
    """The paper's two models, detector grounding_dino and keypoints topdown_heatmap on HRNet,
    through cp-deploy batch with both engines, on the CPU."""
    assert (gdino_bundle.detector.arch, gdino_bundle.keypoints.arch) == ("grounding_dino", "topdown_heatmap")
    out_t, out_o = batch_on_torch_and_onnxruntime(gdino_bundle, gdino_onnx, tmp_path, 3)
    rows_t = [json.loads(r) for r in (out_t / "results.jsonl").read_text().splitlines()]
    rows_o = [json.loads(r) for r in (out_o / "results.jsonl").read_text().splitlines()]
    assert len(rows_t) == 3 and sum(len(r["instances"]) for r in rows_t) == 9  # threshold 0, 3 per image
    for a, b in zip(rows_t, rows_o):
        np.testing.assert_allclose([i["box"] for i in b["instances"]], [i["box"] for i in a["instances"]], atol=1e-2)
        np.testing.assert_allclose([i["points"] for i in b["instances"]], [i["points"] for i in a["instances"]],
                                   atol=0.05)


def test_graphs_of_another_prompt_are_refused(gdino_bundle, gdino_onnx, tmp_path):
    import dataclasses

    from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
    from cp_deploy.errors import EngineError

    other = dataclasses.replace(gdino_bundle, prompt=dataclasses.replace(gdino_bundle.prompt, text="lesion"))
    with pytest.raises(EngineError, match=r"prompt\.text differ"):
        OnnxRuntimeEngine(other, onnx_dir=gdino_onnx)
    assert build_models(gdino_bundle).detector.text == "polyp."
