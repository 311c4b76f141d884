"""The one preprocessing path: image decoding conventions, resize-longest-side, normalization,
padding, and their inverses for coordinates and masks.

Every stage and every engine goes through :func:`preprocess_image` with the settings of the model
it feeds (a :class:`PreprocessConfig`), so the encoder, an image-reading detector and an
image-reading keypoint net can differ in size and normalization without a second code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
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
