"""A domain-shift check of our own: images pushed through what another hospital's endoscope changes.

We cannot score on another hospital's frames, so validation images are also scored after
:func:`domain_shift`: an illumination and colour shift, a specular highlight or two, blur, JPEG
artefacts, a black endoscope border with text overlay, and another aspect ratio and resolution.
Each image's shift is seeded by its name, so the check is the same in every run. The mask moves
with every geometric change (resize, border padding) and nothing else touches it: the polyp stays
where it is, only its look changes.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

SHIFT_SUFFIX = "@shift"  # appended to a sample's name, so the embedding cache keeps shifted images apart


def shift_seed(name: str, seed: int = 0) -> int:
    """A stable per-image seed (Python's ``hash`` of a string changes between processes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _illumination(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour cast, contrast, gamma and a vignette: another light source and sensor."""
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255.0
    x = x * rng.uniform(0.75, 1.2, size=3)  # white balance
    x = (x - 0.5) * rng.uniform(0.75, 1.25) + 0.5 + rng.uniform(-0.08, 0.08)
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r = np.sqrt(((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2)
    x = x * (1.0 - rng.uniform(0.2, 0.5) * np.clip(r / 0.7, 0, 1) ** 2)[..., None]
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def _speculars(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to four small saturated white highlights, as a wet mucosa reflects the light."""
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(int(rng.integers(1, 5))):
        c = (int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.9) * h))
        axes = (max(2, int(rng.uniform(0.005, 0.03) * w)), max(2, int(rng.uniform(0.005, 0.02) * h)))
        spot = np.zeros((h, w), np.float32)
        cv2.ellipse(spot, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        spot = cv2.GaussianBlur(spot, (0, 0), max(axes) / 2)[..., None]
        out = np.clip(out * (1 - spot) + 255.0 * spot, 0, 255).astype(np.uint8)
    return out


def _border(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A black frame around the image with cut corners, and white text on it, as endoscope
    processors draw; the image is padded, not covered, so no polyp pixel is lost."""
    h, w = img.shape[:2]
    pad = [int(rng.uniform(0.0, 0.12) * s) for s in (h, h, w, w)]  # top, bottom, left, right
    img = cv2.copyMakeBorder(img, *pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    mask = cv2.copyMakeBorder(mask.astype(np.uint8), *pad, cv2.BORDER_CONSTANT, value=0) > 0
    hh, ww = img.shape[:2]
    cut = int(rng.uniform(0.05, 0.15) * min(hh, ww))
    corners = [((0, 0), (cut, 0), (0, cut)), ((ww, 0), (ww - cut, 0), (ww, cut)),
               ((0, hh), (cut, hh), (0, hh - cut)), ((ww, hh), (ww - cut, hh), (ww, hh - cut))]
    for tri in corners:
        cv2.fillPoly(img, [np.array(tri, np.int32)], (0, 0, 0))
    scale = max(0.35, min(hh, ww) / 900)
    for _ in range(int(rng.integers(1, 4))):
        text = f"{rng.integers(0, 99):02d}:{rng.integers(0, 59):02d} ID{rng.integers(1000, 9999)}"
        org = (int(rng.uniform(0.0, 0.6) * ww), int(rng.uniform(0.05, 0.98) * hh))
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), max(1, int(2 * scale)),
                    cv2.LINE_AA)
    return img, mask


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 60))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy() if ok else img


def _light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = _speculars(_illumination(image, rng), rng)
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 2.0)) if rng.random() < 0.6 else img


def look_shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of :func:`domain_shift` that moves no pixel (light, highlights, blur, JPEG), so
    anything found on the result lies where it lies on ``image``."""
    return _jpeg(_light(image, rng), rng)


def domain_shift(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (HxWx3 uint8 RGB) and its boolean ``mask`` as another endoscope might give them."""
    img, mask = _border(_light(image, rng), mask, rng)
    h, w = img.shape[:2]
    aspect = rng.uniform(0.75, 1.33)
    side = rng.uniform(0.5, 1.3) * np.sqrt(h * w)
    size = (max(32, int(side * np.sqrt(aspect))), max(32, int(side / np.sqrt(aspect))))  # (width, height)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR)
    mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return _jpeg(img, rng), mask
