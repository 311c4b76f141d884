"""The sam-refine stage: a second prompt encoder and mask decoder on the box head's coarse logits
(from jittered boxes) plus 8 edge points with the bundle's edge label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import EDGE_LABELS, Bundle
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_train import defaults
from cp_train.data import Dataset
from cp_train.stages.common import finish, instance_data, setup, work_dir
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.trainers.sam import detected_boxes, make_sam_epoch, predicted_points
from cp_train.validate import metric_name, validate_head

POINT_SOURCES = ("gt", "predicted")
BOX_SOURCES = ("jitter", "detector")


@dataclass
class SamRefineRecipe(LoopConfig):
    """How to train the refine head: the loop's fields plus where its edge points come from."""

    epochs: int = defaults.STAGE_EPOCHS["sam-refine"]
    batch_size: int = 4
    lr: float = 1e-4
    point_jitter: float = defaults.POINT_JITTER  # Gaussian noise on the training points, in box sides
    train_points: str = "gt"  # "gt", or "predicted": the base's keypoint net's on each jittered box
    val_points: str = "gt"  # the same choice for validation
    # "jitter": GT boxes with noise; "detector": the base's detector's boxes on each training image
    # under another look (cp_train.shift.look_shift), the errors the deployed coarse pass makes
    train_boxes: str = "jitter"
    box_jitter: float = 0.1  # the GT boxes' noise, in box sides (also where the detector finds nothing)
    val_boxes: str = "gt"  # validation on "gt" boxes, or the "detector"'s (where a refine head must pay off)

    def __post_init__(self) -> None:
        for name in ("train_points", "val_points"):
            if getattr(self, name) not in POINT_SOURCES:
                raise ValueError(f"{name} must be one of {', '.join(POINT_SOURCES)}, got {getattr(self, name)!r}")
        if self.val_boxes not in ("gt", "detector"):
            raise ValueError(f"val_boxes must be 'gt' or 'detector', got {self.val_boxes!r}")
        if self.train_boxes not in BOX_SOURCES:
            raise ValueError(f"train_boxes must be one of {', '.join(BOX_SOURCES)}, got {self.train_boxes!r}")


def train(base: Bundle, data: Dataset, recipe: SamRefineRecipe, out: Path, work: Path | None = None) -> Bundle:
    """Train the refine head on ``data`` and write ``out``: ``base`` with that head."""
    s = setup(base, data, "sam-refine", recipe)
    d = instance_data(base, s)
    models = s.val.models
    source = boxes = None
    if recipe.train_points == "predicted" or recipe.train_boxes == "detector":
        pipe = CurriculumPipeline(base, TorchEngine(base, models=models), PipelineOptions(prompts="curriculum"))
    if recipe.train_points == "predicted":  # what the deployed curriculum feeds the head
        source = predicted_points(pipe, d.samples, d.targets, d.embeddings)
    if recipe.train_boxes == "detector":
        boxes = detected_boxes(pipe, d.samples, d.targets, recipe.box_jitter)
    epoch = make_sam_epoch("refine", d.targets, d.embeddings, recipe.batch_size, recipe.seed,
                           box_head=models.box.eval(), edge_label=EDGE_LABELS[base.prompt.edge_label],
                           box_jitter=recipe.box_jitter, point_jitter=recipe.point_jitter, point_source=source,
                           box_source=boxes)
    gt_points, gt_boxes = recipe.val_points == "gt", recipe.val_boxes == "gt"
    state = fit("sam-refine", models.refine, list(models.refine.parameters()), epoch,
                lambda m: validate_head(base, "refine", m, s.val, gt_points, gt_boxes), recipe, work_dir(out, work),
                metric_name("sam-refine", points=recipe.val_points, boxes=recipe.val_boxes), data.progress)
    return finish(base, "sam-refine", s, recipe, out, {"refine": (None, state)})
