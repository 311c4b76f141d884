"""The one preprocessing path: image decoding conventions, resize-longest-side, normalization,
padding, and their inverses for coordinates and masks.

Every stage and every engine goes through :func:`preprocess_image` with the settings of the model
it feeds (a :class:`PreprocessConfig`), so the encoder, an image-reading detector and an
image-reading keypoint net can differ in size and normalization without a second code path.

:func:`preprocess_batch` is the same arithmetic for a whole batch on the model's device: on CUDA
the uint8 pixels are uploaded and resized there by :func:`resize_longest_side_torch`, a port of
Pillow's bilinear resampling (the filter segment_anything's ``ResizeLongestSide`` goes through),
integer for integer and in the installed Pillow's pass order, so its output equals
:func:`preprocess_image`'s bit for bit.
:func:`postprocess_batch` upscales and thresholds a batch's masks in one pass with one copy back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

# SAM's ImageNet statistics on the 0..255 scale (segment_anything.modeling.Sam defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class PreprocessConfig:
    """How one model wants its input.

    ``normalize`` is ``"meanstd"`` (SAM: ``(x - mean) / std`` on the 0..255 scale) or ``"minmax"``
    (LiteMedSAM: each image scaled to [0, 1] by its own min and max).
    """

    image_size: int = 1024
    normalize: str = "meanstd"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    def __post_init__(self) -> None:
        if self.normalize not in ("meanstd", "minmax"):
            raise ValueError(f"normalize must be 'meanstd' or 'minmax', got {self.normalize!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "preprocess") -> PreprocessConfig:
        """Parse a bundle's ``preprocess`` section; a ``ValueError`` names the key ``where.KEY``.

        ``image_size`` and ``normalize`` are required: a silent default (1024, meanstd) would feed
        the model inputs it was not trained on, and every image would fail or come out wrong.
        """
        if not isinstance(d, dict):
            raise ValueError(f"'{where}' must be an object with image_size and normalize, got {type(d).__name__}")
        unknown = sorted(set(d) - {"image_size", "normalize", "pixel_mean", "pixel_std"})
        if unknown:
            raise ValueError(f"'{where}' has unknown key(s) {', '.join(unknown)}; expected image_size, normalize, "
                             "pixel_mean, pixel_std: remove or rename them")
        size = d.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            got = "missing" if "image_size" not in d else f"{size!r}"
            raise ValueError(f"'{where}.image_size' is {got}; expected the model's input side in pixels, a positive "
                             "integer (e.g. 1024 for SAM ViT, 256 for LiteMedSAM)")
        if d.get("normalize") not in ("meanstd", "minmax"):
            got = "missing" if "normalize" not in d else f"{d['normalize']!r}"
            raise ValueError(f"'{where}.normalize' is {got}; expected 'meanstd' or 'minmax'")
        stats = {}
        for k in ("pixel_mean", "pixel_std"):
            if k in d:
                v = d[k]
                if (not isinstance(v, list) or len(v) != 3
                        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)):
                    raise ValueError(f"'{where}.{k}' is {v!r}; expected a list of 3 numbers (R, G, B on 0..255)")
                if k == "pixel_std" and min(v) <= 0:
                    raise ValueError(f"'{where}.pixel_std' is {v!r}; every value must be > 0")
                stats[k] = tuple(float(x) for x in v)
        return cls(image_size=size, normalize=d["normalize"], **stats)

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "normalize": self.normalize,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
        }


@dataclass(frozen=True)
class Geometry:
    """Geometry of one image through resize-longest-side: original and resized (H, W)."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_size: int = field(default=1024)

    @classmethod
    def for_image(cls, original_size: tuple[int, int], image_size: int) -> Geometry:
        h, w = original_size
        return cls((int(h), int(w)), ResizeLongestSide.get_preprocess_shape(h, w, image_size), image_size)

    def _scale(self) -> tuple[float, float]:
        return self.input_size[1] / self.original_size[1], self.input_size[0] / self.original_size[0]

    def coords_to_input(self, coords: np.ndarray) -> np.ndarray:
        """Original-image pixel (x, y) -> model-input pixel, exactly as ResizeLongestSide."""
        sx, sy = self._scale()
        out = np.asarray(coords, dtype=np.float64).copy()
        out[..., 0] *= sx
        out[..., 1] *= sy
        return out

    def coords_to_original(self, coords: np.ndarray) -> np.ndarray:
        sx, sy = self._scale()
        out = np.asarray(coords, dtype=np.float64).copy()
        out[..., 0] /= sx
        out[..., 1] /= sy
        return out

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        return self.coords_to_input(np.asarray(boxes).reshape(-1, 2, 2)).reshape(-1, 4)

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        out = self.coords_to_original(np.asarray(boxes).reshape(-1, 2, 2)).reshape(-1, 4)
        h, w = self.original_size
        out[:, 0::2] = out[:, 0::2].clip(0, w)
        out[:, 1::2] = out[:, 1::2].clip(0, h)
        return out


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a decoded array to HxWx3 uint8 RGB.

    Grayscale is replicated to three channels, alpha is dropped, and 16-bit or float data is
    scaled by its own min and max: medical 16-bit images rarely use the full range, so a fixed
    ``/257`` would leave most of them nearly black.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4 pixels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float64)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def resize_longest_side(image: np.ndarray, image_size: int) -> np.ndarray:
    """HxWx3 uint8 -> resized uint8, with segment_anything's own ResizeLongestSide (PIL bilinear)."""
    return ResizeLongestSide(image_size).apply_image(image)


def normalize_and_pad(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Bx3xhxw float on the 0..255 scale (unpadded, one image per call for minmax) -> padded input."""
    if cfg.normalize == "meanstd":
        mean = torch.tensor(cfg.pixel_mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(cfg.pixel_std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        x = (x - mean) / std
    else:
        lo = x.amin(dim=(-3, -2, -1), keepdim=True)
        hi = x.amax(dim=(-3, -2, -1), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8)
    h, w = x.shape[-2:]
    return F.pad(x, (0, cfg.image_size - w, 0, cfg.image_size - h))


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig) -> tuple[torch.Tensor, Geometry]:
    """HxWx3 uint8 RGB -> (3xSxS float32 model input, its geometry)."""
    geo = Geometry.for_image(image.shape[:2], cfg.image_size)
    resized = resize_longest_side(image, cfg.image_size)
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    return normalize_and_pad(x, cfg), geo


def postprocess_masks(low_res: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Nx1xhxw low-res logits -> NxHxW logits at the original size (as Sam.postprocess_masks)."""
    s = geo.image_size
    x = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
    x = x[..., : geo.input_size[0], : geo.input_size[1]]
    x = F.interpolate(x, geo.original_size, mode="bilinear", align_corners=False)
    return x[:, 0]


# Pillow's 8-bit resampling (libImaging/Resample.c): coefficients in 22-bit fixed point, one
# horizontal then one vertical pass, each rounded and clipped to uint8.
_PIL_BITS = 22


@lru_cache(maxsize=512)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear taps along one axis (``precompute_coeffs`` and ``normalize_coeffs_8bpc``):
    per output index, ``ksize`` input indices (int64) and fixed-point weights (int32; zero beyond
    the taps Pillow uses). The float64 operations follow the C source in order, so the rounded
    weights are Pillow's own."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; a negative start is clipped to 0 anyway.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < count[:, None]
    t = np.abs(((xmin[:, None] + taps[None, :]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(used, np.where(t < 1.0, 1.0 - t, 0.0), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # summed in Pillow's order: the normalised weights round as its do
        total += w[:, k]
    w = w / np.where(total != 0.0, total, 1.0)[:, None]
    fixed = np.trunc(0.5 + w * (1 << _PIL_BITS)).astype(np.int32)  # bilinear weights are >= 0
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)
    return index, np.where(used, fixed, 0).astype(np.int32)


@lru_cache(maxsize=512)
def _taps_on(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index, weight = pil_bilinear_taps(in_size, out_size)
    return torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device)


def _resample_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One of Pillow's 8-bit passes along ``axis`` (0: rows, 1: columns) of HxWxC int32 pixels."""
    in_size = x.shape[axis]
    if in_size == out_size:  # Pillow skips the pass; its taps would be the identity anyway
        return x
    index, weight = _taps_on(in_size, out_size, x.device)
    shape = [1, 1, 1]
    shape[axis] = out_size
    acc = torch.full([out_size if d == axis else n for d, n in enumerate(x.shape)], 1 << (_PIL_BITS - 1),
                     dtype=torch.int32, device=x.device)
    # One tap at a time: a few small kernels instead of an HxWxCxksize intermediate.
    for k in range(index.shape[1]):
        acc += x.index_select(axis, index[:, k]) * weight[:, k].view(shape)
    return (acc >> _PIL_BITS).clamp_(0, 255)


def _resize_two_pass(x: torch.Tensor, new_h: int, new_w: int, vertical_first: bool) -> torch.Tensor:
    if vertical_first:
        return _resample_axis(_resample_axis(x, 0, new_h), 1, new_w)
    return _resample_axis(_resample_axis(x, 1, new_w), 0, new_h)


@cache
def pillow_vertical_first() -> bool:
    """Whether the installed Pillow runs its vertical pass first when the height shrinks by more
    than twice as many pixels as the width (Pillow 13 does, for speed; older ones always go
    horizontal first). The intermediate is rounded to uint8, so the order shows in the pixels:
    probed once on an image where the two orders differ."""
    probe = np.random.default_rng(0).integers(0, 256, (64, 16, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(probe).resize((15, 32), Image.Resampling.BILINEAR))
    x = torch.from_numpy(probe).to(torch.int32)
    return np.array_equal(pil, _resize_two_pass(x, 32, 15, vertical_first=True).numpy())


def resize_longest_side_torch(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """HxWx3 uint8 tensor on any device -> resized HxWx3 uint8 on that device, equal to
    :func:`resize_longest_side` (Pillow bilinear through segment_anything) pixel for pixel."""
    h, w = image.shape[:2]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, image_size)
    # Pillow 13's ImagingResampleInner: vertical first if the height loses > 2x the width's pixels.
    vertical_first = h - new_h > 0 and h - new_h > (w - new_w) * 2 and pillow_vertical_first()
    return _resize_two_pass(image.to(torch.int32), new_h, new_w, vertical_first).to(torch.uint8)


def preprocess_tensors(images: Sequence[torch.Tensor], cfg: PreprocessConfig) -> torch.Tensor:
    """HxWx3 uint8 tensors on one device -> Bx3xSxS float32 model inputs on that device, with
    :func:`preprocess_image`'s arithmetic (resize as Pillow, then :func:`normalize_and_pad`)."""
    return torch.stack([
        normalize_and_pad(resize_longest_side_torch(im, cfg.image_size).permute(2, 0, 1).float(), cfg)
        for im in images
    ])


def preprocess_batch(images: Sequence[np.ndarray], cfg: PreprocessConfig, device: torch.device | str,
                     on_device: bool | None = None) -> torch.Tensor:
    """HxWx3 uint8 RGB images -> Bx3xSxS float32 model inputs on ``device``.

    ``on_device`` (default: when ``device`` is CUDA) uploads the uint8 pixels, a quarter of the
    float input's bytes, and resizes, normalises and pads there (:func:`preprocess_tensors`);
    otherwise each image goes through :func:`preprocess_image` on the CPU and the batch is copied
    once, from pinned memory when ``device`` is CUDA (the copy overlaps work already queued)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not (cuda if on_device is None else on_device):
        x = torch.stack([preprocess_image(im, cfg)[0] for im in images])
        return x.pin_memory().to(device, non_blocking=True) if cuda else x.to(device)
    pixels = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
    if cuda:
        pixels = [p.pin_memory().to(device, non_blocking=True) for p in pixels]
    return preprocess_tensors([p.to(device) for p in pixels], cfg)


def postprocess_batch(low_res: torch.Tensor, counts: Sequence[int], geometry: Sequence[Geometry]
                      ) -> list[torch.Tensor]:
    """Nx1xhxw low-res logits of a batch (``counts[i]`` instances of image ``i``, whose geometries
    share one ``image_size``) -> per image a KxHxW bool tensor on the CPU, equal to
    ``postprocess_masks(logits_i, geometry[i]) > 0``.

    The upscale to the model's input side runs once for the whole batch, and every image's masks
    come back in one copy (one device synchronisation instead of one per image)."""
    if len(counts) != len(geometry) or sum(counts) != len(low_res):
        raise ValueError(f"{len(low_res)} masks for counts {list(counts)} over {len(geometry)} images")
    sizes = {g.image_size for g in geometry}
    if len(sizes) > 1:
        raise ValueError(f"one batch, one model input side; got {sorted(sizes)}")
    if not len(low_res):
        return [torch.zeros(0, *g.original_size, dtype=torch.bool) for g in geometry]
    s = sizes.pop()
    up = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
    flat = []
    for x, geo in zip(up.split(list(counts)), geometry):
        x = x[..., : geo.input_size[0], : geo.input_size[1]]
        if len(x):
            x = F.interpolate(x, geo.original_size, mode="bilinear", align_corners=False)
        flat.append((x[:, 0] > 0).flatten())
    host = torch.cat(flat).cpu()
    return [m.view(k, *g.original_size) for m, k, g in zip(host.split([len(f) for f in flat]), counts, geometry)]
