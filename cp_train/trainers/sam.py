"""SAM head training on cached embeddings: ``box`` on jittered GT boxes; ``refine`` on the
trained box head's coarse logits plus edge points labelled with the edge label (jittered GT
points, or the keypoint net's on the same jittered box); the keypoint net on crops of the
embedding or of the image around jittered GT boxes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from cp_deploy.models.keypoints import expand_boxes, image_to_heatmap
from cp_deploy.models.sam import PromptHead
from cp_deploy.preprocess import Geometry, PreprocessConfig, preprocess_image
from cp_train.data import Sample, jitter_boxes, lowres_target, photometric
from cp_train.losses import dice_bce, gaussian_heatmap_ce
from cp_train.shift import look_shift
from cp_train.targets import mask_instances
from cp_train.trainers.loop import shuffled_epoch


@dataclass
class InstanceTargets:
    """Every instance of a set of samples, in original pixels, with its low-res mask target."""

    image: list[int]
    boxes: np.ndarray  # Nx4
    points: np.ndarray  # Nx8x2
    masks: torch.Tensor  # Nxlxl
    frames: list[Geometry]


def instance_targets(samples: list[Sample], image_size: int, low_size: int) -> InstanceTargets:
    image, boxes, points, masks, frames = [], [], [], [], []
    for i, s in enumerate(samples):
        fr = Geometry.for_image(s.mask.shape, image_size)
        frames.append(fr)
        for inst in mask_instances(s.mask):
            image.append(i)
            boxes.append(inst.box)
            points.append(inst.points)
            masks.append(lowres_target(inst.mask, fr, low_size))
    return InstanceTargets(image, np.array(boxes), np.array(points), torch.stack(masks), frames)


def _to_input(t: InstanceTargets, idx: np.ndarray, xy: np.ndarray, boxes: bool) -> torch.Tensor:
    out = [t.frames[t.image[j]].boxes_to_input(a)[0] if boxes else t.frames[t.image[j]].coords_to_input(a)
           for j, a in zip(idx, xy)]
    return torch.as_tensor(np.stack(out), dtype=torch.float32)


def make_sam_epoch(
    stage: str,
    targets: InstanceTargets,
    embeddings: torch.Tensor,
    batch_size: int,
    seed: int,
    box_head: PromptHead | None = None,
    edge_label: int = 0,
    box_jitter: float = 0.1,
    point_jitter: float = 0.02,
    point_source: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    box_source: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
):
    """One epoch over instances in batches of ``batch_size`` (the paper's batch 4).

    Boxes are the GT boxes with ``box_jitter`` noise, or ``box_source``'s (instance indices, the
    batch's generator -> Nx4 boxes in original pixels), e.g. :func:`detected_boxes`.
    ``refine`` trains on the GT edge points, or with ``point_source`` (instance indices, their
    boxes in original pixels -> Nx8x2 points) on predicted ones, both plus ``point_jitter`` noise.
    """

    def train_epoch(head: PromptHead, opt, epoch: int) -> float:
        return shuffled_epoch(len(targets.image), batch_size, seed, epoch, opt, lambda idx, rng: step(head, idx, rng))

    def step(head: PromptHead, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        emb = embeddings[[targets.image[j] for j in idx]].float()
        if box_source is None:
            jittered = jitter_boxes(targets.boxes[idx], rng, box_jitter)
        else:
            jittered = box_source(idx, rng)
        boxes = _to_input(targets, idx, jittered, boxes=True)
        if stage == "box":
            logits, _ = head(emb, boxes=boxes)
        else:
            with torch.no_grad():
                coarse, _ = box_head(emb, boxes=boxes)
            wh = np.maximum(targets.boxes[idx, 2:] - targets.boxes[idx, :2], 1.0)[:, None, :]
            pts = targets.points[idx] if point_source is None else point_source(idx, jittered)
            pts = pts + rng.normal(0, point_jitter, pts.shape) * wh
            pts = _to_input(targets, idx, pts, boxes=False)
            labels = torch.full(pts.shape[:2], edge_label, dtype=torch.int64)
            logits, _ = head(emb, points=(pts, labels), mask_input=coarse)
        return dice_bce(logits[:, 0], targets.masks[idx])

    return train_epoch


def make_keypoint_epoch(targets: InstanceTargets, features: torch.Tensor | Callable[[list[int]], torch.Tensor],
                        batch_size: int, seed: int, margin: float, sigma: float = 1.5, box_jitter: float = 0.1):
    """Heatmaps on RoIAlign crops around jittered GT boxes.

    ``features`` are what the net reads, per image: cached embeddings (a tensor), or a function of
    image indices giving the preprocessed images (for ``hrnet``); ``targets`` must be in the frame
    of that input. ``sigma`` is the Gaussian target's, in heatmap cells.
    """
    read = features if callable(features) else (lambda imgs, rng: features[imgs].float())

    def train_epoch(net, opt, epoch: int) -> float:
        return shuffled_epoch(len(targets.image), batch_size, seed, epoch, opt, lambda idx, rng: step(net, idx, rng))

    def step(net, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        imgs = sorted(set(targets.image[j] for j in idx))
        local = {g: k for k, g in enumerate(imgs)}
        feats = read(imgs, rng)
        boxes = _to_input(targets, idx, jitter_boxes(targets.boxes[idx], rng, box_jitter), boxes=True)
        crops = expand_boxes(boxes, margin)
        rois = torch.cat([torch.tensor([[float(local[targets.image[j]])] for j in idx]), crops], 1)
        heat = net(feats, rois)
        gt = image_to_heatmap(_to_input(targets, idx, targets.points[idx], boxes=False), crops, heat.shape[-1])
        return gaussian_heatmap_ce(heat, gt, sigma)

    return train_epoch


def image_reader(samples: list[Sample], cfg: PreprocessConfig, augment: bool = True
                 ) -> Callable[[list[int], np.random.Generator], torch.Tensor]:
    """Preprocessed images by index, for a keypoint net that reads the image (made per batch:
    a 1024-pixel float image is 12 MB). With ``augment`` each gets the detector's colour
    augmentation (no geometry: the targets stay put), since a net reading pixels meets other
    hospitals' colours and lighting."""

    def read(imgs: list[int], rng: np.random.Generator) -> torch.Tensor:
        return torch.stack([preprocess_image(photometric(samples[i].image, rng) if augment else samples[i].image,
                                             cfg)[0] for i in imgs])

    return read


def predicted_points(pipeline, samples: list[Sample], targets: InstanceTargets,
                     embeddings: torch.Tensor | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A ``point_source`` for :func:`make_sam_epoch`: the edge points that ``pipeline``'s keypoint
    net (a :class:`~cp_deploy.pipeline.CurriculumPipeline`) gives on each jittered box, so the
    refine head learns to live with the keypoint net's errors as deployed, instead of trusting
    near-perfect GT points."""

    def source(idx: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        imgs = sorted(set(targets.image[j] for j in idx))
        local = {g: k for k, g in enumerate(imgs)}
        emb = embeddings[imgs].float() if embeddings is not None else None
        with torch.no_grad():
            pts, _ = pipeline.keypoints([samples[i].image for i in imgs], torch.as_tensor(boxes, dtype=torch.float32),
                                        image_index=torch.tensor([local[targets.image[j]] for j in idx]),
                                        embeddings=emb)
        return pts.numpy().astype(np.float64)

    return source


def detected_boxes(pipeline, samples: list[Sample], targets: InstanceTargets, box_jitter: float = 0.1,
                   min_iou: float = 0.1) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A ``box_source`` for :func:`make_sam_epoch`: for each instance, the box that ``pipeline``'s
    detector finds on its image after :func:`~cp_train.shift.look_shift` (the detector was trained
    on these images, so on them as they are its boxes are better than on images it never saw;
    another look brings its errors back), the one that overlaps the instance most; the jittered GT
    box where no detected box overlaps it by ``min_iou``."""

    def source(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        imgs = sorted(set(targets.image[j] for j in idx))
        found = pipeline.detect([look_shift(samples[i].image, rng) for i in imgs])
        per_image = {i: f[0].numpy().astype(np.float64) for i, f in zip(imgs, found)}
        gt = targets.boxes[idx].astype(np.float64)
        out = jitter_boxes(gt, rng, box_jitter)
        for n, j in enumerate(idx):
            det = per_image[targets.image[j]]
            if len(det):
                overlap = box_iou(torch.as_tensor(gt[n : n + 1]), torch.as_tensor(det))[0].numpy()
                if overlap.max() >= min_iou:
                    out[n] = det[int(overlap.argmax())]
        return out

    return source

