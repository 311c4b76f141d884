"""Detector training from mask instances: CenterNet targets with focal + L1 losses, or boxes for a
set-prediction detector (Grounding DINO) that computes its own loss."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from cp_deploy.preprocess import Frame, PreprocessConfig, preprocess_image
from cp_train.data import Sample, augment
from cp_train.losses import centernet_focal
from cp_train.targets import mask_instances
from cp_train.trainers.loop import shuffled_epoch


def centernet_targets(boxes: np.ndarray, grid: int, stride: float) -> dict[str, torch.Tensor]:
    """Input-pixel boxes -> heatmap (Gaussian per box, 1 at its centre cell), size and offset
    targets at the centre cells, and the mask of those cells."""
    heat = np.zeros((grid, grid), np.float32)
    size = np.zeros((2, grid, grid), np.float32)
    offset = np.zeros((2, grid, grid), np.float32)
    reg = np.zeros((grid, grid), np.float32)
    ys, xs = np.mgrid[:grid, :grid]
    for x0, y0, x1, y1 in boxes:
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        ix, iy = min(int(cx), grid - 1), min(int(cy), grid - 1)
        sx, sy = max(w / stride / 6, 0.8), max(h / stride / 6, 0.8)
        g = np.exp(-((xs - ix) ** 2) / (2 * sx**2) - ((ys - iy) ** 2) / (2 * sy**2))
        heat = np.maximum(heat, g)
        heat[iy, ix] = 1.0
        size[:, iy, ix] = np.log(w / stride), np.log(h / stride)
        offset[:, iy, ix] = cx - ix, cy - iy
        reg[iy, ix] = 1.0
    maps = (("heatmap", heat[None]), ("size", size), ("offset", offset), ("reg", reg[None]))
    return {k: torch.from_numpy(v) for k, v in maps}


def _stack(xs: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.stack(xs), {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def _augmented(sample: Sample, cfg: PreprocessConfig, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """An augmented, preprocessed image and its instances' boxes (Kx4 xyxy, input pixels)."""
    img, mask = augment(sample.image, sample.mask, rng)
    x, frame = preprocess_image(img, cfg)
    boxes = np.array([i.box for i in mask_instances(mask)]).reshape(-1, 4)
    return x, frame.boxes_to_input(boxes)


def image_batches(samples: list[Sample], cfg: PreprocessConfig, stride: int, workers: int = 1):
    """Batches for a detector that reads the image: augmented, preprocessed, CenterNet targets.

    Each sample draws its own generator from ``rng``, so a batch is the same whatever ``workers``
    is; with more than one, samples are augmented in threads (OpenCV and numpy release the GIL),
    which is what keeps a GPU fed."""
    grid = cfg.image_size // stride
    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def one(j: int, seed: int) -> tuple[torch.Tensor, dict]:
        x, boxes = _augmented(samples[j], cfg, np.random.default_rng(seed))
        return x, centernet_targets(boxes, grid, stride)

    def batch(idx: np.ndarray, rng: np.random.Generator):
        seeds = rng.integers(0, 2**63 - 1, size=len(idx)).tolist()
        pairs = list(pool.map(one, idx, seeds) if pool else map(one, idx, seeds))
        return _stack([x for x, _ in pairs], [t for _, t in pairs])

    return batch


def box_batches(samples: list[Sample], cfg: PreprocessConfig):
    """Batches for a set-prediction detector (Grounding DINO): augmented, preprocessed images and
    per image its boxes (Kx4 float tensor, input pixels)."""

    def batch(idx: np.ndarray, rng: np.random.Generator):
        pairs = [_augmented(samples[j], cfg, rng) for j in idx]
        return torch.stack([x for x, _ in pairs]), [torch.from_numpy(b).float() for _, b in pairs]

    return batch


def set_loss(model, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """The detector's own set loss (its ``forward`` with target boxes)."""
    return model(x, boxes)["loss"]


def embedding_batches(samples: list[Sample], embeddings: torch.Tensor, cfg: PreprocessConfig):
    """Batches for a detector on the cached embedding (no augmentation: the cache is fixed)."""
    grid = embeddings.shape[-1]
    stride = cfg.image_size // grid
    targets = []
    for s in samples:
        frame = Frame.for_image(s.mask.shape, cfg.image_size)
        boxes = np.array([i.box for i in mask_instances(s.mask)]).reshape(-1, 4)
        targets.append(centernet_targets(frame.boxes_to_input(boxes), grid, stride))

    def batch(idx: np.ndarray, rng: np.random.Generator):
        return _stack([embeddings[j].float() for j in idx], [targets[j] for j in idx])

    return batch


def detector_loss(raw: dict[str, torch.Tensor], t: dict[str, torch.Tensor], giou: float = 0.0) -> torch.Tensor:
    """CenterNet's loss: focal on the heatmap, L1 on log size and offset at the centre cells, plus
    ``giou`` times a GIoU loss of the box those two decode to. L1 on log sizes weighs a box's
    width and height apart; GIoU scores the box as the Dice against a GT box will, as a whole."""
    n = t["reg"].sum().clamp(min=1)
    size = (F.l1_loss(raw["size"], t["size"], reduction="none") * t["reg"]).sum() / n
    off = (F.l1_loss(torch.sigmoid(raw["offset"]), t["offset"], reduction="none") * t["reg"]).sum() / n
    loss = centernet_focal(raw["heatmap"], t["heatmap"]) + 0.5 * size + off
    if giou:
        cells = t["reg"][:, 0] > 0  # B x H x W
        pred = _cell_boxes(torch.sigmoid(raw["offset"].float()), raw["size"].float().clamp(-10, 10), cells)
        gt = _cell_boxes(t["offset"], t["size"], cells)
        loss = loss + giou * generalized_box_iou_loss(pred, gt, reduction="sum") / n
    return loss


def _cell_boxes(offset: torch.Tensor, log_size: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Nx4 xyxy boxes, in cells relative to their own cell, decoded at the ``cells`` positions."""
    c = offset.permute(0, 2, 3, 1)[cells]
    wh = torch.exp(log_size.permute(0, 2, 3, 1)[cells])
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise GIoU of two Nx4 xyxy box sets (torchvision's, which returns it as a loss)."""
    return 1 - generalized_box_iou_loss(a, b)


def _to(obj, device: torch.device | None):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def make_train_epoch(n: int, batch_fn, batch_size: int, seed: int, loss=None, device: torch.device | None = None,
                     giou: float = 0.0):
    """One epoch over ``n`` samples; ``batch_fn(indices, rng)`` gives (inputs, targets), moved to
    ``device``, and ``loss(model, inputs, targets)`` the batch loss (default: CenterNet's,
    :func:`detector_loss`, with GIoU weight ``giou``)."""

    def train_epoch(model, opt, epoch: int) -> float:
        def loss_fn(idx, rng):
            x, t = _to(batch_fn(idx, rng), device)
            return detector_loss(model(x), t, giou) if loss is None else loss(model, x, t)

        return shuffled_epoch(n, batch_size, seed, epoch, opt, loss_fn)

    return train_epoch
