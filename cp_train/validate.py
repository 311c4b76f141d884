"""Validation of a stage's net on the carved validation split, and the detector's threshold tuning."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import Bundle
from cp_deploy.files import atomic_write_bytes
from cp_deploy.models.build import Models
from cp_deploy.pipeline import PipelineOptions
from cp_train import distributed
from cp_train.data import Sample
from cp_train.evaluate import evaluate, evaluate_boxes

# The tuning grid: score threshold, minimum and maximum instance count per image.
TUNING_GRID = [{"score_threshold": t, "min_instances": m, "max_instances": k}
               for k in (1, 5) for m in (0, 1) for t in (0.2, 0.3, 0.4)]


@dataclass
class ValidationSet:
    """The validation samples and, where validation runs SAM, the bundle's networks and the
    samples' cached embeddings (``None`` for a detector validated on its boxes)."""

    samples: list[Sample]
    models: Models | None = None
    embeddings: torch.Tensor | None = None
    progress: bool = False  # a progress bar over the validation images


def metric_name(stage: str, detector_metric: str = "sam", points: str = "gt", boxes: str = "gt") -> str:
    """What a stage's validation mDice measures, for its log and printed lines: the SAM heads and
    the keypoint net are scored on ground-truth boxes, the detector on its own boxes."""
    if stage == "detector":
        return "val box Dice (detector vs gt boxes)" if detector_metric == "boxes" else "val mDice (detector boxes)"
    if stage == "sam-refine":
        return f"val mDice ({boxes} boxes, {points} edge points)"
    return "val mDice (gt boxes)"


def validate_detector(bundle: Bundle, net: nn.Module, val: ValidationSet, metric: str = "sam",
                      device: torch.device | str = "cpu") -> dict:
    """mDice of SAM's box pass with ``net`` as detector (``metric`` "sam"), or of its boxes against
    the ground-truth boxes ("boxes": no SAM); ``bundle`` describes ``net`` and its thresholds."""
    if metric == "boxes":
        return evaluate_boxes(bundle, net, val.samples, device, progress=val.progress)
    models = dataclasses.replace(val.models, detector=net)
    return evaluate(bundle, models, val.samples, val.embeddings, PipelineOptions(prompts="box"), device=device,
                    progress=val.progress)


def validate_head(bundle: Bundle, name: str, head: nn.Module, val: ValidationSet, gt_points: bool = True,
                  gt_boxes: bool = True) -> dict:
    """mDice with ground-truth boxes (``gt_boxes`` False: the detector's) of the ``box`` head's
    pass, or of the curriculum with ``head`` as its ``refine`` head (on ground-truth edge points,
    or with ``gt_points`` False the keypoint net's) or as its ``keypoints`` net."""
    models = dataclasses.replace(val.models, **{name: head})
    opts = PipelineOptions(prompts="box" if name == "box" else "curriculum")
    return evaluate(bundle, models, val.samples, val.embeddings, opts, gt_boxes=gt_boxes,
                    gt_points=name == "refine" and gt_points and gt_boxes, progress=val.progress)


def tune_detection(bundle: Bundle, net: nn.Module, val: ValidationSet, metric: str = "sam",
                   device: torch.device | str = "cpu", log: Path | None = None) -> dict:
    """The prompt settings (score threshold, minimum and maximum instances) of :data:`TUNING_GRID`
    with the best :func:`validate_detector` mDice on the validation split (never test data); the
    first of equals wins. Every row is printed and, with ``log``, written there as JSON lines."""
    net.eval()
    best, rows = None, []
    for g in TUNING_GRID:
        tried = dataclasses.replace(bundle, prompt=dataclasses.replace(bundle.prompt, **g))
        r = validate_detector(tried, net, val, metric, device)
        rows.append({**g, **r})
        if distributed.is_main():
            print(f"[detector] val {g}: mDice {r['mDice']:.4f}", flush=True)
        if best is None or r["mDice"] > best[1]:
            best = (g, r["mDice"])
    if log is not None and distributed.is_main():
        log.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(log, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return best[0]
