"""The curriculum against segment_anything's SamPredictor, batching, sizes and the encoder count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from cp_deploy.engines.torch import TorchEngine
from cp_deploy.models.sam import load_sam
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return TorchEngine(tiny_bundle)


def _images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, s, dtype=np.uint8) for s in [(96, 128, 3), (131, 77, 3), (64, 64, 3)]]


def test_matches_sam_predictor(tiny_bundle, engine):
    """Coarse and fine passes equal SamPredictor's box and points+mask predictions."""
    pipe = CurriculumPipeline(tiny_bundle, engine)
    images = _images()
    results = pipe.predict(images)
    sam = load_sam("tiny", str(tiny_bundle.sam.file))
    predictor = SamPredictor(sam)
    checked = 0
    for img, res in zip(images, results):
        predictor.set_image(img)
        for k in range(len(res.boxes)):
            m, _, low = predictor.predict(box=res.boxes[k], multimask_output=False, return_logits=True)
            np.testing.assert_allclose(res.coarse_logits[k], low, atol=1e-4)
            pts = res.points[k]
            m2, _, low2 = predictor.predict(
                point_coords=pts, point_labels=np.zeros(8), mask_input=low, multimask_output=False, return_logits=True
            )
            np.testing.assert_allclose(res.low_res_logits[k], low2, atol=1e-4)
            # Binarised at full resolution: identical but for pixels whose logit is ~0.
            agree = ((m2[0] > 0) == res.masks[k]).mean()
            assert agree > 0.999
            checked += 1
    assert checked >= 2, "the tiny detector should yield instances to compare"


def test_batch_equals_one_at_a_time(tiny_bundle, engine):
    pipe = CurriculumPipeline(tiny_bundle, engine)
    images = _images()
    batched = pipe.predict(images)
    single = [pipe.predict([im])[0] for im in images]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.points, b.points, atol=1e-2)
        assert (a.mask == b.mask).mean() > 0.999


def test_encoder_runs_once_per_image(tiny_bundle):
    engine = TorchEngine(tiny_bundle)
    calls = []
    engine.models.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pipe = CurriculumPipeline(tiny_bundle, engine)
    images = _images()
    results = pipe.predict(images)
    assert sum(len(r.boxes) for r in results) > 0
    assert calls == [3]  # one call for the whole batch, covering both passes


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(2).integers(0, 255, (101, 57, 3), dtype=np.uint8),
        np.random.default_rng(3).integers(0, 255, (33, 250), dtype=np.uint8),
        np.random.default_rng(4).integers(0, 65535, (77, 91), dtype=np.uint16),
        np.random.default_rng(5).integers(0, 255, (40, 41, 4), dtype=np.uint8),
    ],
    ids=["odd-rgb", "gray", "gray16", "rgba"],
)
def test_mask_at_input_size(tiny_bundle, engine, image):
    (res,) = CurriculumPipeline(tiny_bundle, engine).predict([image])
    assert res.mask.shape == image.shape[:2]
    assert res.masks.shape[1:] == image.shape[:2]


@pytest.mark.parametrize("prompts", ["box", "points", "box+points", "box+mask", "curriculum"])
def test_prompt_modes(tiny_bundle, engine, prompts):
    (res,) = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(prompts=prompts)).predict(_images()[:1])
    assert len(res.boxes) > 0
    assert res.points.shape[1] == (0 if prompts in ("box", "box+mask") else 8)
    if prompts == "box":
        np.testing.assert_array_equal(res.low_res_logits, res.coarse_logits)


def test_edge_label_changes_the_fine_pass(tiny_bundle, engine):
    img = _images()[:1]
    neg = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(edge_label="negative")).predict(img)[0]
    pos = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(edge_label="positive")).predict(img)[0]
    np.testing.assert_array_equal(neg.coarse_logits, pos.coarse_logits)
    assert not np.allclose(neg.low_res_logits, pos.low_res_logits)


def test_threshold_nms_topk(tiny_bundle, engine):
    pipe = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(mode="top1"))
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.01])
    b, s = pipe._select(boxes, scores)
    assert s.tolist() == pytest.approx([0.9])
    pipe.mode = "all"
    b, s = pipe._select(boxes, scores)  # the overlapping 0.8 is suppressed; 0.01 is under the threshold
    assert s.tolist() == pytest.approx([0.9, 0.7])
    pipe.score_threshold = 0.95  # none passes; min_instances keeps the best anyway
    assert len(pipe._select(boxes, scores)[0]) == 0
    pipe.min_instances = 1
    assert pipe._select(boxes, scores)[1].tolist() == pytest.approx([0.9])


def test_given_boxes_replace_the_detector(tiny_bundle, engine):
    img = _images()[0]
    (res,) = CurriculumPipeline(tiny_bundle, engine).predict([img], boxes=[np.array([[10, 20, 60, 70]])])
    np.testing.assert_allclose(res.boxes, [[10, 20, 60, 70]])
    (empty,) = CurriculumPipeline(tiny_bundle, engine).predict([img], boxes=[np.zeros((0, 4))])
    assert empty.mask.shape == img.shape[:2] and not empty.mask.any()


def test_given_points_replace_the_keypoint_net(tiny_bundle, engine):
    img = _images()[0]
    pts = np.array([[[20 + i, 30 + i] for i in range(8)]], np.float32)
    pipe = CurriculumPipeline(tiny_bundle, engine)
    (res,) = pipe.predict([img], boxes=[np.array([[10, 20, 60, 70]])], points=[pts])
    np.testing.assert_allclose(res.points, pts)
    (own,) = pipe.predict([img], boxes=[np.array([[10, 20, 60, 70]])])
    assert not np.allclose(own.points, pts)
