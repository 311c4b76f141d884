"""Dice and IoU: the one definition used by evaluation, training and tests."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cp_deploy.errors import InputError
from cp_deploy.files import atomic_write_bytes, discover_images, read_mask


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|) on binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, ground truth {g.shape}")
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P∩G| / |P∪G| on binary masks; 1.0 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, ground truth {g.shape}")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, csv_path: str | Path | None = None) -> dict:
    """Per-image Dice and IoU of predicted masks against ground truth, matched by relative path
    without extension; then their means (the paper's mDice and mIoU).

    ``pred_dir`` may be a run folder (its ``masks/`` is used). An image with ground truth but no
    prediction counts as an empty prediction and is listed under ``missing``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if (pred_dir / "masks").is_dir():
        pred_dir = pred_dir / "masks"
    if not pred_dir.is_dir():
        raise InputError(f"prediction folder '{pred_dir}' does not exist; pass --pred RUN_DIR or its masks/")
    gts = discover_images(gt_dir)
    preds = {p.with_suffix("").as_posix(): p for p in discover_images(pred_dir)}
    rows, missing = [], []
    for g in gts:
        key = g.with_suffix("").as_posix()
        gt = read_mask(gt_dir / g)
        if key in preds:
            pred = read_mask(pred_dir / preds[key])
            if pred.shape != gt.shape:
                raise InputError(
                    f"{pred_dir / preds[key]}: mask is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
                    f"{gt_dir / g} is {gt.shape[1]}x{gt.shape[0]}; predictions must be at the input's size"
                )
        else:
            missing.append(key)
            pred = np.zeros_like(gt)
        rows.append({"image": key, "dice": dice(pred, gt), "iou": iou(pred, gt)})
    summary = {
        "n": len(rows),
        "mDice": float(np.mean([r["dice"] for r in rows])),
        "mIoU": float(np.mean([r["iou"] for r in rows])),
        "missing": missing,
        "rows": rows,
    }
    if csv_path is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["image", "dice", "iou"])
        w.writeheader()
        w.writerows({"image": r["image"], "dice": f"{r['dice']:.6f}", "iou": f"{r['iou']:.6f}"} for r in rows)
        atomic_write_bytes(csv_path, buf.getvalue().encode())
    return summary
