"""Overlays for people to look at: final contour, coarse contour, box and edge points."""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

FINAL = (0, 255, 0)
COARSE = (0, 160, 255)
BOX = (255, 215, 0)
POINT = (255, 40, 40)
GROUND_TRUTH = (255, 0, 255)  # magenta: apart from every colour the overlay itself uses



class Drawable(Protocol):
    """What an overlay shows of a prediction (``pipeline.ImageResult``, which draws itself with
    :func:`draw_overlay`, so this module cannot import it)."""

    mask: np.ndarray
    coarse_mask: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray


def _contour(canvas: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, color, thickness, lineType=cv2.LINE_AA)


def draw_ground_truth(canvas_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``canvas_rgb`` (an overlay or a mask as RGB) with the contour of the ground-truth ``mask``,
    resized to it where the sizes differ (an overlay is at the input's size, as the mask is)."""
    canvas = np.ascontiguousarray(canvas_rgb).copy()
    if mask.shape != canvas.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), canvas.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    # As thick as the final contour: thinner lines vanish in the overlays' JPEG chroma.
    _contour(canvas, mask, GROUND_TRUTH, 2 * max(1, round(max(canvas.shape[:2]) / 400)))
    return canvas


def draw_overlay(image_rgb: np.ndarray, result: Drawable) -> np.ndarray:
    """RGB uint8 image -> RGB uint8 overlay (coarse contour thin, final contour thick)."""
    canvas = image_rgb.copy()
    t = max(1, round(max(canvas.shape[:2]) / 400))
    # Tint the final mask so a filled region is visible even where the contour is small.
    tint = canvas[result.mask].astype(np.float32) * 0.7 + np.array(FINAL, np.float32) * 0.3
    canvas[result.mask] = tint.astype(np.uint8)
    _contour(canvas, result.coarse_mask, COARSE, t)
    _contour(canvas, result.mask, FINAL, 2 * t)
    for (x0, y0, x1, y1), s in zip(result.boxes, result.scores):
        cv2.rectangle(canvas, (int(x0), int(y0)), (int(x1), int(y1)), BOX, t, lineType=cv2.LINE_AA)
        cv2.putText(canvas, f"{s:.2f}", (int(x0), max(12, int(y0) - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * t, BOX, t, lineType=cv2.LINE_AA)
    for pts in result.points:
        for x, y in pts:
            cv2.circle(canvas, (int(round(x)), int(round(y))), 2 * t + 1, POINT, -1, lineType=cv2.LINE_AA)
    return canvas
