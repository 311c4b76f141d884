"""The training library on a tiny synthetic dataset with the tiny bundle: every stage trains, its
loss falls, the embedding cache is reused, resume continues, and the result is a bundle cp-deploy
loads; ensembles fuse trained members."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cp_deploy.bundle import load_bundle, weightless_copy
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.errors import RecipeError
from cp_deploy.models.build import build_models
from cp_deploy.models.centernet import centernet_targets, map_loss
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_deploy.preprocess import PreprocessConfig
from cp_train.data import Dataset, EmbeddingCache, load_samples, read_split
from cp_train.ensemble import ensemble_bundles
from cp_train.stages import detector, keypoints, sam_box, sam_refine
from cp_train.stages.detector import DetectorRecipe
from cp_train.stages.keypoints import KeypointRecipe
from cp_train.stages.sam_box import SamBoxRecipe
from cp_train.stages.sam_refine import SamRefineRecipe
from cp_train.trainers.detector import image_batches
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.trainers.sam import instance_targets, make_sam_epoch, predicted_points


def _data(dataset: Path, tmp_path: Path, **kw) -> Dataset:
    return Dataset(dataset, dataset / "train.txt", val_fraction=0.25, cache_dir=tmp_path / "cache", progress=False,
                   **kw)


def _log(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "log.jsonl").read_text().splitlines()]


def _predict(bundle, dataset: Path):
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.mask.shape == img.shape[:2]
    return res


@pytest.mark.parametrize("stage,train,recipe", [
    ("sam-box", sam_box.train, SamBoxRecipe(epochs=4, lr=1e-3)),
    ("keypoints", keypoints.train, KeypointRecipe(epochs=4)),
    ("sam-refine", sam_refine.train, SamRefineRecipe(epochs=4, lr=1e-3)),
    ("detector", detector.train, DetectorRecipe(epochs=4, size=64, batch_size=3)),
])
def test_stage_trains_and_loss_falls(dataset, tiny_bundle, tmp_path, stage, train, recipe):
    out = tmp_path / "bundle"
    bundle = train(tiny_bundle, _data(dataset, tmp_path), recipe, out)
    losses = [r["loss"] for r in _log(Path(f"{out}-work"), stage)]
    assert len(losses) == recipe.epochs and losses[-1] < losses[0], losses
    assert bundle.root == out and load_bundle(out).metadata[f"trained_{stage}"]["epochs"] == recipe.epochs
    _predict(bundle, dataset)  # cp-deploy runs what the stage wrote


def test_embedding_cache_is_reused(dataset, tiny_bundle, tmp_path):
    models = build_models(tiny_bundle)
    calls = []
    models.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    samples = load_samples(dataset, read_split(dataset / "train.txt")[:5])
    cache = EmbeddingCache(tmp_path, tiny_bundle, models.image_encoder)
    first = cache.fill(samples, progress=False)
    second = cache.fill(samples, progress=False)
    assert sum(calls) == 5 and cache.encoder_calls == 5  # the second pass (epoch) encodes nothing
    assert (first == second).all()


def test_resume_continues_from_the_saved_epoch(dataset, tiny_bundle, tmp_path, capsys):
    out, data = tmp_path / "bundle", _data(dataset, tmp_path)
    sam_box.train(tiny_bundle, data, SamBoxRecipe(epochs=1), out)
    capsys.readouterr()
    sam_box.train(tiny_bundle, data, SamBoxRecipe(epochs=2, resume=True), out)
    printed = capsys.readouterr().out
    assert "resuming after epoch 1/2" in printed and "epoch 1/2" not in printed.replace("after epoch 1/2", "")
    assert [r["epoch"] for r in _log(Path(f"{out}-work"), "sam-box")] == [1, 2]


def test_topdown_keypoints_train_on_image_crops(dataset, tiny_bundle, tmp_path):
    """The topdown_heatmap family replaces the base's embedding head with HRNet on image crops
    (Gaussian heatmap targets); its loss falls and the bundle it writes reads the image."""
    out = tmp_path / "bundle"
    recipe = KeypointRecipe(arch="hrnet", backbone="hrnet_w18_small", crop=64, epochs=4, batch_size=4, lr=2e-3)
    bundle = keypoints.train(tiny_bundle, _data(dataset, tmp_path), recipe, out)
    losses = [r["loss"] for r in _log(Path(f"{out}-work"), "keypoints")]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 3  # the validation images' only: a net on image crops needs no training embeddings
    kp = bundle.keypoints
    assert (kp.arch, kp.reads) == ("topdown_heatmap", "image")  # the alias names the family
    assert (kp.config["backbone"], kp.config["crop_size"]) == ("hrnet_w18_small", 64)
    assert kp.preprocess.image_size == tiny_bundle.preprocess.image_size
    assert _predict(bundle, dataset).points.shape[1:] == (8, 2)


def test_detector_trains_without_sam_on_box_validation(dataset, tmp_path):
    """Box validation of an image-reading detector needs no SAM: it trains (with GIoU, EMA and
    augmentation threads) from the shipped bundle.json without any weight file and computes no
    embedding, then tunes the thresholds on its boxes."""
    base = weightless_copy(tmp_path / "base")
    out = tmp_path / "bundle"
    recipe = DetectorRecipe(epochs=3, size=64, batch_size=3, val_metric="boxes", workers=3, freeze=0, giou=2,
                            ema=0.9)
    bundle = detector.train(base, _data(dataset, tmp_path), recipe, out)
    work = Path(f"{out}-work") / "detector"
    logs = _log(work.parent, "detector")
    assert len(logs) == 3 and logs[-1]["loss"] < logs[0]["loss"]
    assert not (tmp_path / "cache").exists()  # no encoder ran
    tuning = [json.loads(line) for line in (work / "tuning.jsonl").read_text().splitlines()]
    best = max(tuning, key=lambda r: r["mDice"])  # the first of the best, in grid order
    assert len(tuning) == 12 and bundle.prompt.score_threshold == best["score_threshold"]
    assert (bundle.detector.arch, bundle.detector.config.get("members", 1)) == ("lite0_centernet", 1)


def test_box_validation_refuses_a_detector_on_the_embedding(dataset, tiny_bundle, tmp_path):
    with pytest.raises(RecipeError, match="box validation is for detectors that read the image"):
        detector.train(tiny_bundle, _data(dataset, tmp_path), DetectorRecipe(arch="embedding_centernet",
                                                                             val_metric="boxes"), tmp_path / "b")


def test_augmented_batches_do_not_depend_on_the_worker_count(dataset):
    samples = load_samples(dataset, read_split(dataset / "train.txt")[:6], progress=False)
    cfg = PreprocessConfig(image_size=64, normalize="meanstd")
    idx = np.arange(6)
    (x1, b1), (x4, b4) = (image_batches(samples, cfg, workers=w)(idx, np.random.default_rng(3)) for w in (1, 4))
    assert (x1 == x4).all() and all(torch.equal(a, b) for a, b in zip(b1, b4))
    assert all(len(b) == 1 and b.dtype == torch.float64 for b in b1)  # one lesion each, exact input pixels


def test_the_centernet_loss_by_hand():
    t = {k: v[None] for k, v in centernet_targets(np.array([[10.0, 4.0, 42.0, 20.0]]), (8, 8), 8).items()}
    logit = lambda p: torch.log(p / (1 - p))  # noqa: E731
    exact = {"heatmap": torch.where(t["heatmap"] == 1, 20.0, -20.0), "size": t["size"].clone(),
             "offset": logit(t["offset"].clamp(0.01, 0.99))}
    assert t["offset"][:, :, 1, 3].tolist() == [[0.25, 0.5]]  # the centre cell's; its logits are exact
    base = map_loss(exact, t)
    assert torch.isclose(map_loss(exact, t, giou=2.0), base, atol=1e-5)  # a perfect box costs nothing
    wider = dict(exact, size=exact["size"] + torch.tensor([0.5, 0.0]).view(1, 2, 1, 1))
    iou = 1 / np.exp(0.5)  # same centre and height, width x e^0.5: IoU = hull-IoU = e^-0.5
    extra = map_loss(wider, t, giou=2.0) - map_loss(wider, t)
    assert torch.isclose(extra, torch.tensor(2 * (1 - iou), dtype=extra.dtype), atol=1e-5)


def test_ema_weights_are_validated_and_kept(tmp_path):
    """With LoopConfig.ema, fit validates and returns the moving average of the weights after each
    optimiser step (the first step copies them), not the raw weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    seen: list[torch.Tensor] = []
    decay = 0.8

    def train_epoch(m, opt, epoch):
        for _ in range(3):
            loss = (m(torch.randn(4, 3)) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(m.weight.detach().clone())
        return float(loss.detach())

    calls = iter(range(100))
    state = fit("ema", model, list(model.parameters()), train_epoch, lambda m: {"mDice": next(calls)},
                LoopConfig(epochs=2, lr=0.1, ema=decay), tmp_path)
    expected = seen[0]
    for w in seen[1:]:
        expected = decay * expected + (1 - decay) * w
    assert torch.allclose(state["weight"], expected, atol=1e-6)
    assert not torch.allclose(state["weight"], model.weight)
    assert "ema" in torch.load(tmp_path / "ema" / "last.pt", weights_only=True)


def test_box_validation_scores_the_ground_truth_boxes_one():
    from cp_deploy.metrics import dice
    from cp_train.evaluate import box_mask

    gt = box_mask(np.array([[2, 3, 5, 9]]), (12, 12))
    assert gt.sum() == 4 * 7  # inclusive pixel indices
    assert dice(box_mask(np.array([[2.2, 2.8, 5.1, 9.4]]), (12, 12)), gt) == 1.0
    assert dice(box_mask(np.array([[6, 0, 9, 2]]), (12, 12)), gt) == 0.0


def test_refine_trains_on_the_keypoint_nets_points_on_the_same_jittered_box(dataset, tiny_bundle, tmp_path):
    """With ``point_source`` the refine head is prompted with what the deployed keypoint net gives
    on the very box that made the coarse mask, not with the ground-truth edge points."""
    models = build_models(tiny_bundle)
    samples = load_samples(dataset, ["s00", "s01", "s02", "s03"], progress=False)
    with torch.no_grad():
        emb = EmbeddingCache(tmp_path / "cache", tiny_bundle, models.image_encoder).fill(samples, progress=False)
    targets = instance_targets(samples, tiny_bundle.preprocess.image_size, models.box.mask_input_size[0])
    engine = TorchEngine(tiny_bundle, models=models)
    pipe = CurriculumPipeline(tiny_bundle, engine, PipelineOptions(prompts="curriculum"))
    source = predicted_points(pipe, samples, targets, emb)
    calls, prompted, coarse_boxes = [], [], []

    def spy(idx, boxes):
        calls.append((idx.copy(), boxes.copy(), source(idx, boxes)))
        return calls[-1][2]

    models.refine.register_forward_hook(lambda m, i, kw, o: prompted.append(kw["points"][0].clone()), with_kwargs=True)
    models.box.register_forward_hook(lambda m, i, kw, o: coarse_boxes.append(kw["boxes"].clone()), with_kwargs=True)
    epoch = make_sam_epoch("refine", targets, emb, 2, seed=0, box_head=models.box, point_jitter=0.0,
                           point_source=spy)
    opt = torch.optim.AdamW(models.refine.parameters(), lr=1e-4)
    epoch(models.refine, opt, 0)
    assert len(calls) == len(prompted) == 2  # four instances, batch 2
    for (idx, boxes, pts), seen, box_in in zip(calls, prompted, coarse_boxes):
        frames = [targets.frames[targets.image[j]] for j in idx]
        expect = np.stack([f.coords_to_input(p) for f, p in zip(frames, pts)])
        np.testing.assert_allclose(seen.numpy(), expect, atol=1e-4)  # the net's points reach the head
        np.testing.assert_allclose(box_in.numpy(), np.stack([f.boxes_to_input(b)[0] for f, b in zip(frames, boxes)]),
                                   atol=1e-4)  # made from the same jittered box as the coarse mask
        assert not np.allclose(pts, targets.points[idx], atol=0.5)  # not the ground truth
        for j, b, p in zip(idx, boxes, pts):  # and what the pipeline's keypoint stage gives alone
            alone, _ = pipe.keypoints([samples[targets.image[j]].image], torch.as_tensor(b[None], dtype=torch.float32),
                                      embeddings=emb[[targets.image[j]]].float())
            np.testing.assert_allclose(p, alone[0].numpy(), atol=1e-3)


def test_ensemble_bundle_from_trained_detectors(dataset, tiny_bundle, tmp_path, capsys):
    """``cp-train ensemble`` fuses trained lite0 detectors into a bundle cp-deploy runs, re-tunes
    its thresholds on validation, and refuses members that cannot be fused, naming the bundle."""
    from cp_train.cli import main as train_main

    runs = []
    for seed, size in ((0, 64), (1, 64), (0, 96)):
        out = tmp_path / f"det{seed}-{size}"
        recipe = DetectorRecipe(epochs=1, size=size, batch_size=3, val_metric="boxes", seed=seed)
        runs.append(detector.train(tiny_bundle, _data(dataset, tmp_path), recipe, out).root)
    ens = tmp_path / "ens"
    tuning = ["--data", str(dataset), "--split", str(dataset / "train.txt"), "--val-fraction", "0.25"]
    capsys.readouterr()  # forget the members' own training output
    assert train_main(["ensemble", "--out", str(ens), str(runs[0]), str(runs[1]), *tuning]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("[detector] val {") for line in lines) == 12  # the tuning grid ran
    printed = json.loads(lines[-1])
    bundle = load_bundle(ens)
    assert printed["tuned"]["score_threshold"] == bundle.prompt.score_threshold  # re-tuned on validation
    assert bundle.detector.config["members"] == 2 and bundle.keypoints.arch == load_bundle(runs[0]).keypoints.arch
    models = build_models(bundle)  # strict load of members.0.* and members.1.*
    members = [build_models(load_bundle(r)).detector for r in runs[:2]]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p = torch.stack([torch.sigmoid(m(x)["heatmap"]) for m in members]).mean(0)
        assert torch.allclose(torch.sigmoid(models.detector(x)["heatmap"]), p, atol=2e-3)  # fp16 storage
    _predict(bundle, dataset)
    capsys.readouterr()
    assert train_main(["ensemble", "--out", str(tmp_path / "bad"), str(runs[0]), str(runs[2])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cp-train: error: ") and "det0-96" in err and "differs" in err
    assert train_main(["ensemble", "--out", str(tmp_path / "bad"), str(ens), str(runs[0])]) == 2
    assert "members must each be a single" in capsys.readouterr().err


def test_keypoint_ensemble_fuses_fresh_members(dataset, tiny_bundle, tmp_path):
    """Keypoint members trained afresh with other seeds on one carved split fuse by their mean
    heatmap logits."""
    data = _data(dataset, tmp_path, val_seed=0)
    runs = [keypoints.train(tiny_bundle, data, KeypointRecipe(epochs=1, seed=seed, init="fresh"),
                            tmp_path / f"kp{seed}") for seed in (0, 1)]
    bundle = ensemble_bundles(runs, tmp_path / "kp-ens", "keypoints")
    assert bundle.keypoints.config["members"] == 2
    nets = [build_models(r).keypoints for r in runs]
    fused = build_models(bundle).keypoints
    side = bundle.preprocess.image_size
    with torch.no_grad():
        feats = torch.randn(1, *build_models(bundle).image_encoder(torch.zeros(1, 3, side, side)).shape[1:])
    rois = torch.tensor([[0.0, 2.0, 2.0, 10.0, 12.0]])
    with torch.no_grad():
        mean = torch.stack([n(feats, rois) for n in nets]).mean(0)
        assert torch.allclose(fused(feats, rois), mean, atol=5e-3)  # members stored in fp16
    assert _predict(bundle, dataset).points.shape[1:] == (8, 2)


def test_refine_trains_on_the_detectors_boxes_under_another_look(dataset, tiny_bundle, tmp_path, monkeypatch):
    """With ``detected_boxes`` the coarse pass of refine training is prompted with the detector's
    box that overlaps each instance most, found on the image after ``look_shift``; the jittered
    ground-truth box where the detector finds nothing that overlaps."""
    from cp_train.trainers import sam as sam_trainer

    models = build_models(tiny_bundle)
    samples = load_samples(dataset, ["s00", "s01", "s02", "s03"], progress=False)
    targets = instance_targets(samples, tiny_bundle.preprocess.image_size, models.box.mask_input_size[0])
    seen = []
    monkeypatch.setattr(sam_trainer, "look_shift", lambda img, rng: seen.append(img) or img[..., ::-1].copy())

    class FakeDetector:  # one box that overlaps the first instance, none on the others' images
        def detect(self, images):
            out = []
            for img in images:
                k = next(i for i, s in enumerate(samples) if np.array_equal(s.image[..., ::-1], img))
                if k == targets.image[0]:
                    b = torch.as_tensor(targets.boxes[:1] + [1, -1, 2, 1], dtype=torch.float32)
                    out.append((torch.cat([b, torch.tensor([[0.0, 0.0, 1.0, 1.0]])]), torch.tensor([0.9, 0.8])))
                else:
                    out.append((torch.zeros(0, 4), torch.zeros(0)))
            return out

    source = sam_trainer.detected_boxes(FakeDetector(), samples, targets, box_jitter=0.0)
    idx = np.arange(len(targets.image))
    boxes = source(idx, np.random.default_rng(0))
    assert len(seen) == len(set(targets.image))  # each image looked at once, under the shift
    np.testing.assert_allclose(boxes[0], targets.boxes[0] + [1, -1, 2, 1])  # the overlapping detection
    np.testing.assert_allclose(boxes[1:], targets.boxes[1:])  # nothing found: the GT box (jitter 0 here)
