"""Datasets in the ``images/`` + ``masks/`` layout, splits, augmentation and the embedding cache."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from cp_deploy.bundle import Bundle
from cp_deploy.errors import DataError
from cp_deploy.files import IMAGE_EXTENSIONS, atomic_write_bytes, read_image, read_mask
from cp_deploy.preprocess import preprocess_image, resize_longest_side, to_rgb_uint8
from cp_train import distributed
from cp_train.defaults import DEFAULT_CACHE_DIR
from cp_train.shift import domain_shift


def read_split(path: str | Path) -> list[str]:
    """Names (without extension), one per line; blank lines and ``#`` comments ignored.

    A missing split and one that names no image are errors: training on nothing is never meant."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; pass --split a text file of image names, one per line")
    lines = path.read_text().splitlines()
    names = [s.strip() for s in lines if s.strip() and not s.startswith("#")]
    if not names:
        raise DataError(f"{path}: the split names no image; list the training images' names (without "
                        "extension), one per line")
    return names


def check_dataset(data_dir: str | Path, names: list[str], split: str | Path) -> None:
    """Check that ``data_dir`` has ``images/`` and ``masks/`` and an image and a mask for every one
    of ``names`` (read from ``split``), so that a bad dataset fails before any model is built or
    embedding computed, and not half-way through a stage."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset folder; pass --data a folder with images/ and masks/")
    for sub in ("images", "masks"):
        folder = data_dir / sub
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder; --data must be a folder with images/ and masks/ "
                            "(a mask per image, same name)")
        missing = []
        for n in names:
            try:
                _find(folder, n)
            except DataError:
                missing.append(n)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{split}: {len(missing)} of its {len(names)} names have no file in {folder} "
                            f"({shown}); remove them from the split or add the files "
                            f"({'/'.join(IMAGE_EXTENSIONS)})")


def carve_validation(names: list[str], fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of the training names (val never overlaps train)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    val = sorted(order[:n_val])
    return sorted(order[n_val:]), val


def _find(folder: Path, name: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = folder / f"{name}{e}"
            if p.is_file():
                return p
    raise DataError(f"no image named '{name}' with a known extension in {folder}")


@dataclass
class Sample:
    name: str
    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW bool


def load_samples(
    data_dir: str | Path, names: list[str], max_side: int | None = None, progress: bool = True
) -> list[Sample]:
    """Decode images and masks; optionally shrink both to ``max_side`` (longest side) to save memory."""
    data_dir = Path(data_dir)
    out = []
    for n in tqdm(names, desc="loading", unit="img", leave=False, disable=not progress):
        img = to_rgb_uint8(read_image(_find(data_dir / "images", n)))
        mask = read_mask(_find(data_dir / "masks", n))
        if mask.shape != img.shape[:2]:
            raise DataError(f"{n}: mask {mask.shape} and image {img.shape[:2]} differ in size")
        if max_side is not None and max(img.shape[:2]) > max_side:
            img = resize_longest_side(img, max_side)
            mask = cv2.resize(mask.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        out.append(Sample(n, img, mask))
    return out


@dataclass(frozen=True)
class Dataset:
    """What a stage trains and validates on: the ``images/`` + ``masks/`` folder, the split file of
    training names, how validation is carved from it, and where embeddings are cached."""

    root: Path
    split: Path
    val_fraction: float = 0.1
    val_seed: int = 0  # seed of the carve alone, so members trained with other seeds share it
    max_images: int = 0  # at most this many training names, and max(N // 4, 5) validation names (0: all)
    cache_dir: Path = DEFAULT_CACHE_DIR
    progress: bool = True

    def names(self) -> tuple[list[str], list[str]]:
        """(training names, validation names), the validation ones carved from the split. A small
        run (``max_images`` N) validates on at most max(N // 4, 5) of them too: encoding a full
        validation split would cost more than training on N images."""
        train, val = carve_validation(read_split(self.split), self.val_fraction, self.val_seed)
        if not self.max_images:
            return train, val
        return train[: self.max_images], val[: max(self.max_images // 4, 5)]

    def carved_sizes(self) -> tuple[int, int]:
        """How many training and validation names the carve gives before ``max_images``."""
        train, val = carve_validation(read_split(self.split), self.val_fraction, self.val_seed)
        return len(train), len(val)

    def check(self) -> None:
        """Refuse a split, folder or carve that cannot be trained on, before any model is built."""
        names = read_split(self.split)
        check_dataset(self.root, names, self.split)
        train, _ = carve_validation(names, self.val_fraction, self.val_seed)
        if not train:
            raise DataError(f"{self.split}: its {len(names)} name(s) all go to validation (--val-fraction "
                            f"{self.val_fraction}); list more images or lower --val-fraction")

    def load(self, names: list[str], max_side: int | None = None) -> list[Sample]:
        """The samples of ``names`` (see :func:`load_samples`)."""
        return load_samples(self.root, names, max_side=max_side, progress=self.progress)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, shift: float = 0.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Photometric and geometric augmentation aimed at other hospitals' images: flips, 90-degree
    turns, scale/shift crops, colour, contrast, gamma and blur; with probability ``shift``, then
    the domain shift of :mod:`cp_train.shift` (another endoscope's light, highlights, JPEG, border,
    text and aspect ratio). Targets are derived afterwards from the augmented mask, so boxes and
    points always agree with it."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    k = int(rng.integers(0, 4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    h, w = mask.shape
    s = rng.uniform(0.7, 1.0)
    ch, cw = int(h * s), int(w * s)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = mask[y0 : y0 + ch, x0 : x0 + cw]
    if crop.sum() > 0.5 * mask.sum():  # keep most of the lesion in view
        image, mask = image[y0 : y0 + ch, x0 : x0 + cw], crop
    if shift and rng.random() < shift:
        return domain_shift(np.ascontiguousarray(image), np.ascontiguousarray(mask), rng)
    return photometric(image, rng), np.ascontiguousarray(mask)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The colour half of :func:`augment` (contrast, brightness, colour cast, gamma, blur), which
    moves no pixel, so targets in image coordinates stay valid."""
    img = np.ascontiguousarray(image).astype(np.float32)
    img = img * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)  # contrast, brightness
    img = img * rng.uniform(0.85, 1.15, size=3)  # per-channel colour cast
    img = np.clip(img, 0, 255)
    img = 255.0 * (img / 255.0) ** rng.uniform(0.7, 1.4)  # gamma
    img = img.astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    return img


def encoder_id(bundle: Bundle) -> str:
    """Identifies the frozen encoder and its preprocessing, so a cache never mixes encoders."""
    key = json.dumps([bundle.sam_arch, bundle.sam.sha256, bundle.preprocess.to_dict()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class EmbeddingCache:
    """Frozen-encoder embeddings on disk (fp16, one file per image), computed once.

    Both SAM heads, the embedding-reading keypoint net, every epoch and the validation reuse it.
    ``encoder_calls`` counts images actually encoded, for tests and logs.
    """

    def __init__(self, root: str | Path, bundle: Bundle, encode) -> None:
        self.dir = Path(root) / encoder_id(bundle)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = bundle.preprocess
        self.encode = encode
        self.encoder_calls = 0

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def get(self, sample: Sample) -> torch.Tensor:
        p = self.path(sample.name)
        if p.is_file():
            return torch.load(p, weights_only=True)
        x, _ = preprocess_image(sample.image, self.cfg)
        emb = self.encode(x[None])[0].to(torch.float16).cpu()
        self.encoder_calls += 1
        buf = io.BytesIO()
        torch.save(emb, buf)
        atomic_write_bytes(p, buf.getvalue())  # a unique temporary, so ranks sharing the folder never collide
        return emb

    def fill(self, samples: list[Sample], progress: bool = True) -> torch.Tensor:
        """All embeddings of ``samples`` stacked (N x C x h x w, fp16), computing the missing ones.

        Under ``torchrun`` each rank first computes the missing embeddings of its share of
        ``samples``, then, once all have, every rank reads the whole set from the shared folder."""
        if distributed.world_size() > 1:
            mine = [samples[i] for i in distributed.shard(samples)]
            for s in tqdm(mine, desc="embeddings (this rank)", unit="img", disable=not progress):
                if not self.path(s.name).is_file():
                    self.get(s)
            distributed.barrier()
        out = [self.get(s) for s in tqdm(samples, desc="embeddings", unit="img", disable=not progress)]
        return torch.stack(out)


def lowres_target(mask: np.ndarray, frame, low_size: int) -> torch.Tensor:
    """An original-size mask in the padded model frame at the decoder's low resolution (the
    geometry ``postprocess_masks`` inverts)."""
    h, w = frame.input_size
    m = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    full = np.zeros((frame.image_size, frame.image_size), np.float32)
    full[:h, :w] = m
    if low_size != frame.image_size:
        full = cv2.resize(full, (low_size, low_size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((full >= 0.5).astype(np.float32))


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, scale: float = 0.1) -> np.ndarray:
    """Gaussian noise of ``scale`` x the box side on each edge, so heads see detector-like error."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    wh = np.maximum(b[:, 2:] - b[:, :2], 1.0)
    b += rng.normal(0, scale, b.shape) * np.concatenate([wh, wh], 1)
    return np.concatenate([np.minimum(b[:, :2], b[:, 2:] - 1), np.maximum(b[:, 2:], b[:, :2] + 1)], 1)
