"""The sam-box stage: SAM's box prompt encoder and mask decoder on jittered ground-truth boxes,
the image encoder frozen (its embeddings cached)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_train import defaults
from cp_train.data import Dataset
from cp_train.stages.common import finish, instance_data, setup, work_dir
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.trainers.sam import make_sam_epoch
from cp_train.validate import metric_name, validate_head


@dataclass
class SamBoxRecipe(LoopConfig):
    """How to train the box head: the loop's fields, at the paper's batch 4 and lr 1e-4."""

    epochs: int = defaults.STAGE_EPOCHS["sam-box"]
    batch_size: int = 4
    lr: float = 1e-4


def train(base: Bundle, data: Dataset, recipe: SamBoxRecipe, out: Path, work: Path | None = None) -> Bundle:
    """Train the box head on ``data`` and write ``out``: ``base`` with that head."""
    s = setup(base, data, "sam-box", recipe)
    d = instance_data(base, s)
    head = s.val.models.box
    epoch = make_sam_epoch("box", d.targets, d.embeddings, recipe.batch_size, recipe.seed)
    state = fit("sam-box", head, list(head.parameters()), epoch, lambda m: validate_head(base, "box", m, s.val),
                recipe, work_dir(out, work), metric_name("sam-box"), data.progress)
    return finish(base, "sam-box", s, recipe, out, {"box": (None, state)})
