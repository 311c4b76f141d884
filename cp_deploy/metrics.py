"""Dice and IoU: the one definition used by evaluation, training and tests; HD95 and normalised
surface Dice (NSD) from MONAI's implementations (the optional ``metrics`` extra).

Surface metrics of empty masks, where MONAI returns nan: both empty is a perfect match (HD95 0,
NSD 1, as Dice is 1); exactly one empty gives NSD 0 (no boundary point lies within tolerance)
and an undefined HD95 (no distance exists), reported as ``None`` (null in JSON, an empty CSV
cell) and left out of mHD95, whose summary counts such images in ``hd95_undefined``.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from cp_deploy.constants import NSD_TOLERANCE
from cp_deploy.errors import InputError, MissingExtraError
from cp_deploy.files import atomic_write_bytes, discover_images, read_mask

METRICS_EXTRA = "metrics"


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


def _monai_metrics():
    try:
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    except ImportError as e:
        raise MissingExtraError.for_feature("--surface (HD95 and NSD by MONAI)", METRICS_EXTRA) from e
    return compute_hausdorff_distance, compute_surface_dice


def surface_metrics(pred: np.ndarray, gt: np.ndarray, tolerance: float = NSD_TOLERANCE) -> tuple[float | None, float]:
    """(HD95, NSD at ``tolerance`` pixels) of two binary HxW masks, by MONAI; empty masks as the
    module docstring says."""
    hausdorff, surface_dice = _monai_metrics()
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, ground truth {g.shape}")
    if not p.any() and not g.any():
        return 0.0, 1.0
    if not p.any() or not g.any():
        return None, 0.0
    yp, yg = (torch.from_numpy(m)[None, None].float() for m in (p, g))  # batch x channel x H x W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on what is handled above
        hd = hausdorff(yp, yg, include_background=True, percentile=95).item()
        nsd = surface_dice(yp, yg, [float(tolerance)], include_background=True).item()
    return float(hd), float(nsd)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, csv_path: str | Path | None = None,
                  surface: bool = False, nsd_tolerance: float = NSD_TOLERANCE) -> dict:
    """Per-image Dice and IoU of predicted masks against ground truth, matched by relative path
    without extension; then their means (the paper's mDice and mIoU). ``surface`` adds HD95 and
    NSD at ``nsd_tolerance`` pixels (:func:`surface_metrics`) and their means, mHD95 and mNSD.

    ``pred_dir`` may be a run folder (its ``masks/`` is used). An image with ground truth but no
    prediction counts as an empty prediction and is listed under ``missing``.
    """
    if surface:
        _monai_metrics()  # a missing extra fails before any mask is read
        if nsd_tolerance < 0:
            raise InputError(f"--nsd-tolerance {nsd_tolerance}: must be at least 0 (pixels)")
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
        row = {"image": key, "gt": g.as_posix(), "dice": dice(pred, gt), "iou": iou(pred, gt)}
        if surface:
            row["hd95"], row["nsd"] = surface_metrics(pred, gt, nsd_tolerance)
        rows.append(row)
    summary = {
        "n": len(rows),
        "mDice": float(np.mean([r["dice"] for r in rows])),
        "mIoU": float(np.mean([r["iou"] for r in rows])),
        "missing": missing,
        "rows": rows,
    }
    if surface:
        hd = [r["hd95"] for r in rows if r["hd95"] is not None]
        summary.update({"mHD95": float(np.mean(hd)) if hd else None, "hd95_undefined": len(rows) - len(hd),
                        "mNSD": float(np.mean([r["nsd"] for r in rows])), "nsd_tolerance": nsd_tolerance})
    if csv_path is not None:
        fields = ["image", "dice", "iou", *(["hd95", "nsd"] if surface else [])]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows({"image": r["image"], **{k: _fmt(r[k]) for k in fields[1:]}} for r in rows)
        atomic_write_bytes(csv_path, buf.getvalue().encode())
    return summary
