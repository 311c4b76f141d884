"""Training and evaluation targets from a binary mask: the one definition.

* **Instances**: 8-connected components of the mask, each with its holes filled; components
  smaller than ``min_area`` pixels are dropped as specks.
* **Box**: an instance's tight box ``[x0, y0, x1, y1]`` in pixel indices, inclusive (as
  ``segment_anything.utils.amg.batched_mask_to_box``).
* **8 edge points**: from the instance's centroid c, a ray at angle k*45 degrees for k = 0..7;
  0 degrees points to +x and angles grow counter-clockwise on screen (90 degrees is -y). Point k
  is the last mask pixel along ray k (the outermost boundary crossing). Order is fixed by k, so
  a horizontal flip swaps (0,4), (1,3), (5,7) and a vertical flip swaps (1,7), (2,6), (3,5).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NUM_EDGE_POINTS = 8
HFLIP_PERM = np.array([4, 3, 2, 1, 0, 7, 6, 5])
VFLIP_PERM = np.array([0, 7, 6, 5, 4, 3, 2, 1])
DEFAULT_MIN_AREA = 16


@dataclass
class Instance:
    mask: np.ndarray  # HxW bool, holes filled
    box: np.ndarray  # 4 float, xyxy inclusive pixel indices
    points: np.ndarray  # 8x2 float (x, y), pixel indices


def instance_masks(mask: np.ndarray, min_area: int = DEFAULT_MIN_AREA) -> list[np.ndarray]:
    """Connected components of ``mask`` with holes filled, largest first, specks dropped."""
    m = np.asarray(mask, bool).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = []
    for c in contours:
        filled = np.zeros_like(m)
        cv2.drawContours(filled, [c], -1, 1, thickness=cv2.FILLED)
        filled = filled.astype(bool)
        if filled.sum() >= min_area:
            out.append(filled)
    return sorted(out, key=lambda x: -int(x.sum()))


def mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def edge_points(mask: np.ndarray) -> np.ndarray:
    """The 8 edge points of one instance mask (see the module docstring), as 8x2 (x, y)."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    h, w = mask.shape
    reach = float(np.hypot(h, w))
    t = np.arange(0.0, reach, 0.25)
    pts = np.zeros((NUM_EDGE_POINTS, 2), np.float32)
    for k in range(NUM_EDGE_POINTS):
        a = np.deg2rad(45.0 * k)
        px = np.rint(cx + t * np.cos(a)).astype(int)
        py = np.rint(cy - t * np.sin(a)).astype(int)
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        px, py = px[inside], py[inside]
        hit = np.nonzero(mask[py, px])[0]
        if len(hit):
            pts[k] = px[hit[-1]], py[hit[-1]]
        else:  # a ray that misses a non-convex shape: fall back to the mask pixel nearest c
            j = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
            pts[k] = xs[j], ys[j]
    return pts


def mask_instances(mask: np.ndarray, min_area: int = DEFAULT_MIN_AREA) -> list[Instance]:
    """Instances of a GT mask with their boxes and edge points."""
    return [Instance(m, mask_box(m), edge_points(m)) for m in instance_masks(mask, min_area)]


def hflip_points(points: np.ndarray, width: int) -> np.ndarray:
    """Edge points of the horizontally flipped image, in the same k order."""
    p = points[..., HFLIP_PERM, :].copy()
    p[..., 0] = width - 1 - p[..., 0]
    return p


def vflip_points(points: np.ndarray, height: int) -> np.ndarray:
    p = points[..., VFLIP_PERM, :].copy()
    p[..., 1] = height - 1 - p[..., 1]
    return p
