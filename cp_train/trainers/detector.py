"""Detector batches from mask instances: what the detector reads (augmented images, or cached
embeddings) with each image's boxes, for its family's loss."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cp_deploy.preprocess import Geometry, PreprocessConfig, preprocess_image
from cp_train.data import Sample, augment
from cp_train.targets import mask_instances
from cp_train.trainers.loop import shuffled_epoch

Epoch = Callable[[torch.nn.Module, torch.optim.Optimizer, int], float]
# A batch: the detector's inputs and per image its Kx4 xyxy boxes in input pixels (float64, as the
# targets are computed from them).
Batch = tuple[torch.Tensor, list[torch.Tensor]]


def _boxes(mask: np.ndarray) -> np.ndarray:
    return np.array([i.box for i in mask_instances(mask)]).reshape(-1, 4)


def image_batches(samples: list[Sample], cfg: PreprocessConfig, workers: int = 1, shift: float = 0.0
                  ) -> Callable[[np.ndarray, np.random.Generator], Batch]:
    """Batches for a detector that reads the image: augmented (``shift``: the domain shift's
    probability, :func:`~cp_train.data.augment`), preprocessed images and their boxes.

    Each sample draws its own generator from ``rng``, so a batch is the same whatever ``workers``
    is; with more than one, samples are augmented in threads (OpenCV and numpy release the GIL),
    which is what keeps a GPU fed."""
    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def one(j: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = augment(samples[j].image, samples[j].mask, np.random.default_rng(seed), shift)
        x, frame = preprocess_image(img, cfg)
        return x, torch.from_numpy(frame.boxes_to_input(_boxes(mask)))

    def batch(idx: np.ndarray, rng: np.random.Generator) -> Batch:
        seeds = rng.integers(0, 2**63 - 1, size=len(idx)).tolist()
        pairs = list(pool.map(one, idx, seeds) if pool else map(one, idx, seeds))
        return torch.stack([x for x, _ in pairs]), [b for _, b in pairs]

    return batch


def embedding_batches(samples: list[Sample], embeddings: torch.Tensor, cfg: PreprocessConfig
                      ) -> Callable[[np.ndarray, np.random.Generator], Batch]:
    """Batches for a detector on the cached embedding (no augmentation: the cache is fixed)."""
    boxes = [torch.from_numpy(Geometry.for_image(s.mask.shape, cfg.image_size).boxes_to_input(_boxes(s.mask)))
             for s in samples]

    def batch(idx: np.ndarray, rng: np.random.Generator) -> Batch:
        return torch.stack([embeddings[j].float() for j in idx]), [boxes[j] for j in idx]

    return batch


def make_train_epoch(n: int, batch_fn: Callable[[np.ndarray, np.random.Generator], Batch], batch_size: int,
                     seed: int, loss: Callable[[torch.nn.Module, torch.Tensor, list[torch.Tensor]], torch.Tensor],
                     device: torch.device | None = None) -> Epoch:
    """One epoch over ``n`` samples: ``batch_fn(indices, rng)`` gives (inputs, boxes), moved to
    ``device``, and ``loss(model, inputs, boxes)`` the batch loss."""

    def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int) -> float:
        def loss_fn(idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
            x, boxes = batch_fn(idx, rng)
            if device is not None:
                x, boxes = x.to(device, non_blocking=True), [b.to(device) for b in boxes]
            return loss(model, x, boxes)

        return shuffled_epoch(n, batch_size, seed, epoch, opt, loss_fn)

    return train_epoch
