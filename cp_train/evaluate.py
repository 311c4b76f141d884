"""Score a bundle's networks through the deployment pipeline itself (one Dice, one path)."""

from __future__ import annotations

import numpy as np
import torch

from cp_deploy.bundle import Bundle
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.metrics import dice, iou
from cp_deploy.models.build import Models
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_train.data import Sample
from cp_train.targets import mask_instances


def evaluate(
    bundle: Bundle,
    models: Models,
    samples: list[Sample],
    embeddings: torch.Tensor | None = None,
    options: PipelineOptions | None = None,
    gt_boxes: bool = False,
    gt_points: bool = False,
    batch_size: int = 8,
) -> dict:
    """mDice / mIoU of the pipeline on ``samples`` (optionally with GT boxes and edge points)."""
    engine = TorchEngine(bundle, models=models)
    pipe = CurriculumPipeline(bundle, engine, options)
    dices, ious = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        boxes = points = None
        if gt_boxes:
            insts = [mask_instances(s.mask) for s in chunk]
            boxes = [np.array([x.box for x in ins]).reshape(-1, 4) for ins in insts]
            if gt_points:
                points = [np.array([x.points for x in ins]).reshape(-1, 8, 2) for ins in insts]
        emb = None if embeddings is None else embeddings[i : i + batch_size]
        for s, r in zip(chunk, pipe.predict([s.image for s in chunk], boxes=boxes, points=points, embeddings=emb)):
            dices.append(dice(r.mask, s.mask))
            ious.append(iou(r.mask, s.mask))
    return {"mDice": float(np.mean(dices)), "mIoU": float(np.mean(ious))}
