"""The training stages, each ``train(base, data, recipe, out, work) -> Bundle`` with its recipe.

sam-refine trains on ground-truth edge points, so it comes before the keypoint net, whose
validation then runs through the trained refine head: the order ``train_stages`` keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_train.data import Dataset
from cp_train.stages import detector, keypoints, sam_box, sam_refine
from cp_train.trainers.loop import LoopConfig


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: type[LoopConfig]
    train: Callable[[Bundle, Dataset, LoopConfig, Path, Path | None], Bundle]


STAGES = {s.name: s for s in (
    Stage("detector", detector.DetectorRecipe, detector.train),
    Stage("sam-box", sam_box.SamBoxRecipe, sam_box.train),
    Stage("sam-refine", sam_refine.SamRefineRecipe, sam_refine.train),
    Stage("keypoints", keypoints.KeypointRecipe, keypoints.train),
)}


def train_stages(base: Bundle, data: Dataset, recipes: dict[str, LoopConfig], out: Path,
                 work: Path | None = None) -> Bundle:
    """Train the stages of ``recipes`` (by name) in :data:`STAGES` order, each on top of the
    bundle the one before wrote to ``out``; returns the last."""
    unknown = set(recipes) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(STAGES)}")
    for name, stage in STAGES.items():
        if name in recipes:
            base = stage.train(base, data, recipes[name], out, work)
    return base
