"""The curriculum against segment_anything's SamPredictor, batching, sizes, the encoder count, the
prompt-mode table, stage timers, batched coordinate transforms and the public stage methods."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from cp_deploy.constants import PROMPT_MODES
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.models.sam import load_sam
from cp_deploy.pipeline import (
    PROMPT_TABLE,
    STAGES,
    Batch,
    CurriculumPipeline,
    PipelineOptions,
    PromptMode,
    Resize,
    StageTimer,
    stage_timers,
)
from cp_deploy.preprocess import Geometry, PreprocessConfig


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


class _Spy:
    """An engine that records which decoder heads run and what they are prompted with."""

    def __init__(self, engine):
        self.engine, self.device, self.heads = engine, engine.device, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, head, embeddings, points=None, boxes=None, mask_input=None):
        self.heads.append((head, {k for k, v in [("points", points), ("box", boxes), ("mask", mask_input)]
                                  if v is not None}))
        return self.engine.decode(head, embeddings, points=points, boxes=boxes, mask_input=mask_input)


def test_the_table_has_one_row_per_prompt_mode():
    assert set(PROMPT_TABLE) == set(PROMPT_MODES)


@pytest.mark.parametrize("prompts", PROMPT_MODES)
def test_each_mode_runs_the_passes_of_its_row(tiny_bundle, engine, prompts):
    """The decoder calls are exactly the row's: the box head on the box, then the refine head on
    the row's prompts, with the points labelled as the row says."""
    spy = _Spy(engine)
    row = PROMPT_TABLE[prompts]
    (res,) = CurriculumPipeline(tiny_bundle, spy, PipelineOptions(prompts=prompts)).predict(_images()[:1])
    expect = ([("box", {"box"})] if row.coarse else []) + ([("refine", set(row.refine))] if row.refine else [])
    assert len(res.boxes) > 0 and spy.heads == expect
    assert res.points.shape[1] == (8 if row.points else 0)


def test_a_refine_pass_on_the_mask_needs_a_coarse_pass():
    with pytest.raises(ValueError, match="coarse"):
        PromptMode(coarse=False, refine=("mask",))


def test_stage_timer_synchronises_cuda_before_each_clock_read(monkeypatch):
    """On CUDA, kernels finish inside the stage that queued them; the CPU never synchronises."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    gpu = types.SimpleNamespace(type="cuda")
    timer = StageTimer(gpu)
    with timer:
        assert calls == [gpu]  # work queued before the stage is not charged to it
    assert calls == [gpu, gpu]
    with timer:
        pass
    assert len(calls) == 4 and timer.ms > 0
    calls.clear()
    with StageTimer(torch.device("cpu")):
        pass
    assert calls == []


def test_stage_timer_accumulates_its_blocks():
    timer = StageTimer(torch.device("cpu"))
    for _ in range(2):
        with timer:
            time.sleep(0.01)
    assert 20 <= timer.ms < 1000
    assert set(stage_timers(torch.device("cpu"))) == set(STAGES)


def test_batched_transforms_equal_the_per_instance_ones():
    """Resize maps a whole batch exactly as Geometry maps one instance at a time (same float64
    arithmetic, so the float32 results are identical)."""
    rng = np.random.default_rng(0)
    sizes = [(546, 626), (131, 77), (1080, 1920), (64, 64)]
    geometry = [Geometry.for_image(s, 256) for s in sizes]
    image = torch.as_tensor(rng.integers(0, len(sizes), 40))
    xy = rng.uniform(-20, 2000, (40, 2, 2)).astype(np.float32)
    boxes = torch.as_tensor(np.concatenate([xy.min(1), xy.max(1)], 1))
    points = torch.as_tensor(rng.uniform(-20, 2000, (40, 8, 2)).astype(np.float32))
    r = Resize.of(geometry)[image]
    per = [geometry[i] for i in image.tolist()]

    def each(f, x):
        return np.stack([f(g, a) for g, a in zip(per, x.numpy())]).astype(np.float32)

    np.testing.assert_array_equal(r.boxes_to_model(boxes).numpy(), each(lambda g, b: g.boxes_to_input(b)[0], boxes))
    np.testing.assert_array_equal(r.boxes_to_image(boxes).numpy(),
                                  each(lambda g, b: g.boxes_to_original(b)[0], boxes))
    np.testing.assert_array_equal(r.points_to_model(points).numpy(), each(Geometry.coords_to_input, points))
    np.testing.assert_array_equal(r.points_to_image(points).numpy(), each(Geometry.coords_to_original, points))


def test_batch_preprocesses_once_per_config(tiny_bundle):
    batch = Batch(_images(), torch.device("cpu"))
    cfg = PreprocessConfig(image_size=64, normalize="minmax")
    assert batch.inputs(cfg) is batch.inputs(PreprocessConfig(image_size=64, normalize="minmax"))
    assert batch.inputs(cfg).shape == (3, 3, 64, 64)
    assert [g.original_size for g in batch.geometry(cfg)] == [(96, 128), (131, 77), (64, 64)]


@pytest.mark.parametrize("prompts", ["curriculum", "box"])
def test_from_bundle_equals_the_explicit_construction(tiny_bundle, engine, prompts):
    images = _images()
    ref = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(prompts=prompts)).predict(images)
    for source in (tiny_bundle, tiny_bundle.root):
        pipe = CurriculumPipeline.from_bundle(source, "torch", "cpu", prompts=prompts)
        assert pipe.options == PipelineOptions(prompts=prompts)
        for a, b in zip(ref, pipe.predict(images)):
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.points, b.points)


def test_from_bundle_refuses_an_unknown_option(tiny_bundle):
    with pytest.raises(TypeError):
        CurriculumPipeline.from_bundle(tiny_bundle, prompt="box")


def test_public_stages_give_what_predict_gives(tiny_bundle, engine):
    """detect and keypoints, called by evaluation and training with keywords only, return the
    boxes and points of predict (on the CPU)."""
    pipe = CurriculumPipeline(tiny_bundle, engine)
    images = _images()
    results = pipe.predict(images)
    detected = pipe.detect(images)
    for (boxes, scores), res in zip(detected, results):
        assert boxes.device.type == "cpu"
        np.testing.assert_array_equal(boxes.numpy(), res.boxes)
        np.testing.assert_array_equal(scores.numpy(), res.scores)
    boxes = torch.cat([b for b, _ in detected])
    index = torch.repeat_interleave(torch.arange(3), torch.tensor([len(r.boxes) for r in results]))
    points, conf = pipe.keypoints(images, boxes, image_index=index)
    np.testing.assert_array_equal(points.numpy(), np.concatenate([r.points for r in results]))
    np.testing.assert_array_equal(conf.numpy(), np.concatenate([r.point_scores for r in results]))
    (alone,) = pipe.predict(images[1:2])  # the encoder's numbers depend on the batch a little
    emb = engine.encode(Batch(images[1:2], engine.device).inputs(pipe.sam_cfg))
    one, _ = pipe.keypoints(images[1:2], torch.as_tensor(alone.boxes), embeddings=emb)
    np.testing.assert_array_equal(one.numpy(), alone.points)


def test_every_stage_is_timed(tiny_bundle, engine):
    (res,) = CurriculumPipeline(tiny_bundle, engine).predict(_images()[:1])
    assert list(res.timings_ms) == list(STAGES)
    assert res.timings_ms["encode"] > 0
