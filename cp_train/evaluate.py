"""Score a bundle's networks through the deployment pipeline itself (one Dice, one path)."""

from __future__ import annotations

import json
from pathlib import Path

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


def score_folder(bundle: Bundle, folder: str | Path, options: PipelineOptions | None = None) -> dict:
    """mDice / mIoU of ``bundle`` on ``folder``/images against ``folder``/masks (matched by stem)."""
    from cp_deploy.io import discover_images, read_image, read_mask
    from cp_deploy.models.build import build_models

    folder = Path(folder)
    masks = {p.with_suffix("").as_posix(): folder / "masks" / p for p in discover_images(folder / "masks")}
    samples = [
        Sample(p.stem, read_image(folder / "images" / p), read_mask(masks[p.with_suffix("").as_posix()]))
        for p in discover_images(folder / "images")
    ]
    return evaluate(bundle, build_models(bundle), samples, options=options, batch_size=1)


def record_examples(bundle_dir: str | Path, folder: str | Path) -> dict:
    """Score the curriculum on ``folder`` and record it in the bundle's metadata (bundle.json)."""
    from cp_deploy.bundle import BUNDLE_FILE, load_bundle

    bundle = load_bundle(bundle_dir)
    scores = score_folder(bundle, folder)
    path = bundle.root / BUNDLE_FILE
    spec = json.loads(path.read_text())
    rounded = {k: round(v, 4) for k, v in scores.items()}
    spec.setdefault("metadata", {})["examples"] = {"prompts": "curriculum", **rounded}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(path)
    return scores


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Record a bundle's curriculum mDice on an images/ + masks/ folder.")
    ap.add_argument("--bundle", required=True, help="bundle directory to update")
    ap.add_argument("--examples", default="examples", help="folder with images/ and masks/")
    a = ap.parse_args()
    print(json.dumps(record_examples(a.bundle, a.examples)))
