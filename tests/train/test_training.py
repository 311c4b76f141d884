"""cp-train on a tiny synthetic dataset with the tiny bundle: every stage trains, its loss falls,
the embedding cache is reused, --resume continues, and the result is a bundle cp-deploy loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.models.build import build_models
from cp_deploy.pipeline import CurriculumPipeline
from cp_train.cli import main as train_main
from cp_train.data import EmbeddingCache, load_samples, read_split


def _args(dataset, out, base, *extra):
    return ["--data", str(dataset), "--split", str(dataset / "train.txt"), "--out", str(out), "--base", str(base),
            "--cache-dir", str(out.parent / "cache"), "--val-fraction", "0.25", "--no-progress", *extra]


def _losses(work: Path, stage: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (work / stage / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage,epochs,extra", [
    ("sam-box", 4, ["--lr", "1e-3"]),
    ("keypoints", 4, []),
    ("sam-refine", 4, ["--lr", "1e-3"]),
    ("detector", 4, ["--detector-size", "64", "--batch-size", "3"]),
])
def test_stage_trains_and_loss_falls(dataset, tiny_bundle, tmp_path, stage, epochs, extra):
    out = tmp_path / "bundle"
    assert train_main([stage, *_args(dataset, out, tiny_bundle.root, "--epochs", str(epochs), *extra)]) == 0
    losses = _losses(Path(f"{out}-work"), stage)
    assert len(losses) == epochs and losses[-1] < losses[0], losses
    bundle = load_bundle(out)  # cp-deploy loads what cp-train wrote
    assert bundle.metadata[f"trained_{stage}"]["epochs"] == epochs
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.mask.shape == img.shape[:2]


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
    out = tmp_path / "bundle"
    assert train_main(["sam-box", *_args(dataset, out, tiny_bundle.root, "--epochs", "1")]) == 0
    capsys.readouterr()
    assert train_main(["sam-box", *_args(dataset, out, tiny_bundle.root, "--epochs", "2", "--resume")]) == 0
    printed = capsys.readouterr().out
    assert "resuming after epoch 1/2" in printed and "epoch 1/2" not in printed.replace("after epoch 1/2", "")
    epochs = [json.loads(x)["epoch"] for x in (Path(f"{out}-work") / "sam-box" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_hrnet_keypoints_train_on_image_crops(dataset, tiny_bundle, tmp_path):
    """--keypoint-arch hrnet replaces the base's embedding head with HRNet on image crops (Gaussian
    heatmap targets); its loss falls and the bundle it writes reads the image."""
    out = tmp_path / "bundle"
    extra = ["--keypoint-arch", "hrnet", "--keypoint-backbone", "hrnet_w18_small", "--keypoint-crop", "64",
             "--epochs", "4", "--batch-size", "4", "--lr", "2e-3"]
    assert train_main(["keypoints", *_args(dataset, out, tiny_bundle.root, *extra)]) == 0
    losses = _losses(Path(f"{out}-work"), "keypoints")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 3  # the validation images' only: a net on image crops needs no training embeddings
    bundle = load_bundle(out)
    kp = bundle.keypoints
    assert (kp.arch, kp.reads) == ("hrnet", "image")
    assert (kp.config["backbone"], kp.config["crop_size"]) == ("hrnet_w18_small", 64)
    assert kp.preprocess.image_size == tiny_bundle.preprocess.image_size
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.mask.shape == img.shape[:2] and res.points.shape[1:] == (8, 2)


def test_detector_trains_without_sam_on_box_validation(dataset, tiny_bundle, tmp_path, monkeypatch, capsys):
    """--val-metric boxes validates and tunes the image-reading detector on its boxes alone: no SAM
    is built (so a GPU machine needs only the detector's weights and the images), and every stage
    but the detector refuses it."""
    import cp_train.cli as cli

    def no_sam(bundle):
        raise AssertionError("build_models called: box validation must not need SAM")

    monkeypatch.setattr(cli, "build_models", no_sam)
    out = tmp_path / "bundle"
    extra = ["--epochs", "3", "--detector-size", "64", "--batch-size", "3", "--val-metric", "boxes",
             "--workers", "3", "--detector-freeze", "0", "--giou", "2", "--ema", "0.9"]
    assert train_main(["detector", *_args(dataset, out, tiny_bundle.root, *extra)]) == 0
    work = Path(f"{out}-work") / "detector"
    logs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and logs[-1]["loss"] < logs[0]["loss"]
    assert all(0.0 <= r["mDice"] <= 1.0 for r in logs)
    assert len((work / "tuning.jsonl").read_text().splitlines()) == 12
    assert load_bundle(out).detector.arch == "lite0_centernet"
    assert train_main(["keypoints", *_args(dataset, out, tiny_bundle.root, "--val-metric", "boxes")]) == 2
    assert "--val-metric boxes is for the detector stage" in capsys.readouterr().err


def test_augmented_batches_do_not_depend_on_the_worker_count(dataset):
    import numpy as np

    from cp_deploy.preprocess import PreprocessConfig
    from cp_train.trainers.detector import image_batches

    samples = load_samples(dataset, read_split(dataset / "train.txt")[:6], progress=False)
    cfg = PreprocessConfig(image_size=64, normalize="meanstd")
    idx = np.arange(6)
    (x1, t1), (x4, t4) = (image_batches(samples, cfg, 8, workers=w)(idx, np.random.default_rng(3)) for w in (1, 4))
    assert (x1 == x4).all() and all((t1[k] == t4[k]).all() for k in t1)


def test_generalized_iou_and_the_detector_loss_by_hand():
    import torch

    from cp_train.trainers.detector import centernet_targets, detector_loss, generalized_iou

    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [2.0, 0.0, 3.0, 1.0]])
    # identical: 1; half overlap: IoU 2/6, hull = union; disjoint: IoU 0, hull 3, union 2
    assert torch.allclose(generalized_iou(a, b), torch.tensor([1.0, 1 / 3, -1 / 3]))
    t = {k: v[None] for k, v in centernet_targets(np.array([[10.0, 4.0, 42.0, 20.0]]), 8, 8).items()}
    logit = lambda p: torch.log(p / (1 - p))  # noqa: E731
    exact = {"heatmap": torch.where(t["heatmap"] == 1, 20.0, -20.0), "size": t["size"].clone(),
             "offset": logit(t["offset"].clamp(0.01, 0.99))}
    assert t["offset"][:, :, 1, 3].tolist() == [[0.25, 0.5]]  # the centre cell's; its logits are exact
    base = detector_loss(exact, t)
    assert torch.isclose(detector_loss(exact, t, giou=2.0), base, atol=1e-5)  # a perfect box costs nothing
    wider = dict(exact, size=exact["size"] + torch.tensor([0.5, 0.0]).view(1, 2, 1, 1))
    iou = 1 / np.exp(0.5)  # same centre and height, width x e^0.5: IoU = hull-IoU = e^-0.5
    extra = detector_loss(wider, t, giou=2.0) - detector_loss(wider, t)
    assert torch.isclose(extra, torch.tensor(2 * (1 - iou), dtype=extra.dtype), atol=1e-5)


def test_ema_weights_are_validated_and_kept(tmp_path):
    """With LoopConfig.ema, fit validates and returns the moving average of the weights after each
    optimiser step (the first step copies them), not the raw weights."""
    import torch

    from cp_train.trainers.loop import LoopConfig, fit

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
    import numpy as np

    from cp_deploy.metrics import dice
    from cp_train.evaluate import box_mask

    gt = box_mask(np.array([[2, 3, 5, 9]]), (12, 12))
    assert gt.sum() == 4 * 7  # inclusive pixel indices
    assert dice(box_mask(np.array([[2.2, 2.8, 5.1, 9.4]]), (12, 12)), gt) == 1.0
    assert dice(box_mask(np.array([[6, 0, 9, 2]]), (12, 12)), gt) == 0.0


def test_refine_point_jitter_and_validation_points_reach_the_trainer(dataset, tiny_bundle, tmp_path, monkeypatch):
    import cp_train.cli as cli
    import cp_train.trainers.sam as sam

    seen = {"jitter": [], "gt_points": [], "source": []}
    make, evaluate = sam.make_sam_epoch, cli.evaluate

    def spy_make(*a, **k):
        seen["jitter"].append(k["point_jitter"])
        seen["source"].append(k["point_source"] is not None)
        return make(*a, **k)

    def spy_evaluate(*a, **k):
        seen["gt_points"].append(k.get("gt_points"))
        return evaluate(*a, **k)

    monkeypatch.setattr(sam, "make_sam_epoch", spy_make)
    monkeypatch.setattr(cli, "evaluate", spy_evaluate)
    out = tmp_path / "bundle"
    extra = ["--epochs", "1", "--point-jitter", "0.05", "--refine-points", "predicted", "--refine-train-points",
             "predicted"]
    assert train_main(["sam-refine", *_args(dataset, out, tiny_bundle.root, *extra)]) == 0
    assert seen == {"jitter": [0.05], "gt_points": [False], "source": [True]}


def test_refine_trains_on_the_keypoint_nets_points_on_the_same_jittered_box(dataset, tiny_bundle, tmp_path):
    """With ``point_source`` the refine head is prompted with what the deployed keypoint net gives
    on the very box that made the coarse mask, not with the ground-truth edge points."""
    import numpy as np
    import torch

    from cp_deploy.engines.torch import TorchEngine
    from cp_deploy.models.build import build_models
    from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
    from cp_train.data import EmbeddingCache, load_samples
    from cp_train.trainers.sam import instance_targets, make_sam_epoch, predicted_points

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
                                      torch.zeros(1, dtype=torch.long), emb[[targets.image[j]]].float(),
                                      [targets.frames[targets.image[j]]])
            np.testing.assert_allclose(p, alone[0].numpy(), atol=1e-3)


def test_ensemble_bundle_from_trained_detectors(dataset, tiny_bundle, tmp_path, capsys):
    """python -m cp_train.ensemble fuses trained lite0 detectors into a bundle cp-deploy runs, and
    refuses members that cannot be fused, naming the bundle."""
    import torch

    from cp_train.ensemble import main as ensemble_main

    runs = []
    for seed, size in ((0, 64), (1, 64), (0, 96)):
        out = tmp_path / f"det{seed}-{size}"
        extra = ["--epochs", "1", "--detector-size", str(size), "--batch-size", "3", "--val-metric", "boxes",
                 "--seed", str(seed)]
        assert train_main(["detector", *_args(dataset, out, tiny_bundle.root, *extra)]) == 0
        runs.append(out)
    ens = tmp_path / "ens"
    tuning = ["--data", str(dataset), "--split", str(dataset / "train.txt"), "--val-fraction", "0.25"]
    capsys.readouterr()  # forget the members' own training output
    assert ensemble_main(["--out", str(ens), str(runs[0]), str(runs[1]), *tuning]) == 0
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
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.mask.shape == img.shape[:2]
    capsys.readouterr()
    assert ensemble_main(["--out", str(tmp_path / "bad"), str(runs[0]), str(runs[2])]) == 2
    assert re.search("det0-96.*differs", capsys.readouterr().err)
    assert ensemble_main(["--out", str(tmp_path / "bad"), str(ens), str(runs[0])]) == 2
    assert "members must each be a single" in capsys.readouterr().err


def test_keypoint_ensemble_members_share_the_validation_split(dataset, tiny_bundle, tmp_path, monkeypatch):
    """--seed 1 --val-seed 0 trains a fresh keypoint member on the split seed 0 carved, and
    python -m cp_train.ensemble --stage keypoints fuses the members by their mean heatmap logits."""
    import torch

    import cp_train.cli as cli
    from cp_train.ensemble import main as ensemble_main

    seeds = []
    carve = cli.carve_validation
    monkeypatch.setattr(cli, "carve_validation", lambda n, f, s: seeds.append(s) or carve(n, f, s))
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"kp{seed}"
        extra = ["--epochs", "1", "--seed", str(seed), "--val-seed", "0", "--keypoint-init", "fresh"]
        assert train_main(["keypoints", *_args(dataset, out, tiny_bundle.root, *extra)]) == 0
        runs.append(out)
    assert seeds and set(seeds) == {0}  # every carve (the up-front check and the stage) uses --val-seed
    ens = tmp_path / "kp-ens"
    assert ensemble_main(["--stage", "keypoints", "--out", str(ens), *map(str, runs)]) == 0
    bundle = load_bundle(ens)
    assert bundle.keypoints.config["members"] == 2
    nets = [build_models(load_bundle(r)).keypoints for r in runs]
    fused = build_models(bundle).keypoints
    side = bundle.preprocess.image_size
    with torch.no_grad():
        feats = torch.randn(1, *build_models(bundle).image_encoder(torch.zeros(1, 3, side, side)).shape[1:])
    rois = torch.tensor([[0.0, 2.0, 2.0, 10.0, 12.0]])
    with torch.no_grad():
        mean = torch.stack([n(feats, rois) for n in nets]).mean(0)
        assert torch.allclose(fused(feats, rois), mean, atol=5e-3)  # members stored in fp16
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.points.shape[1:] == (8, 2)


def test_gpu_lease_base_without_weights_trains_a_detector(dataset, tmp_path):
    """The base the GPU lease carries instead of the 42 MB of weights: the shipped bundle.json with
    no weight file still loads, and a detector validated on its boxes trains from it."""
    from benchmarks.gpu_data import pack, weightless_base

    base = weightless_base(tmp_path / "base").parent
    assert [p.name for p in base.iterdir()] == ["bundle.json"]
    spec = load_bundle(base)
    assert spec.detector.file is None and spec.keypoints.file is None and spec.box_head.file is None
    packed = tmp_path / "packed"
    assert pack(dataset, dataset / "train.txt", packed, max_side=64, quality=90) > 0
    out = tmp_path / "det"
    args = ["--data", str(packed), "--split", str(packed / "train.txt"), "--out", str(out), "--base", str(base),
            "--val-fraction", "0.25", "--no-progress", "--epochs", "1", "--detector-size", "64", "--batch-size", "3",
            "--val-metric", "boxes"]
    assert train_main(["detector", *args]) == 0
    trained = load_bundle(out)
    assert trained.detector.file is not None and trained.detector.config.get("members", 1) == 1
    last = (tmp_path / "det-work" / "detector" / "log.jsonl").read_text().splitlines()[-1]
    assert np.isfinite(json.loads(last)["loss"])
