"""The keypoints stage: a keypoint net of any registered family (on crops of the SAM embedding or
of the image, as its family reads) on jittered ground-truth boxes, validated through the
curriculum."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import Bundle, StageSpec
from cp_deploy.models.build import stage_entry
from cp_deploy.models.families.topdown_heatmap import load_backbone
from cp_deploy.models.registry import BuildContext, build_keypoint_net, keypoint_family
from cp_deploy.preprocess import PreprocessConfig
from cp_train import defaults
from cp_train.data import Dataset
from cp_train.stages.common import finish, imagenet_start, instance_data, setup, work_dir
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.trainers.sam import image_reader, instance_targets, make_keypoint_epoch
from cp_train.validate import metric_name, validate_head

INITS = ("base", "fresh")


@dataclass
class KeypointRecipe(LoopConfig):
    """How to train the keypoint net: the loop's fields plus the net (``None``: the base's)."""

    epochs: int = defaults.STAGE_EPOCHS["keypoints"]
    batch_size: int = 16
    lr: float = 1e-3
    arch: str | None = None  # a registered keypoint family; None: the base bundle's
    backbone: str | None = None  # image-reading families: the timm backbone
    backbone_checkpoint: Path | None = None  # a local timm checkpoint to start that backbone from
    crop: int | None = None  # image-reading families: crop side in pixels
    size: int | None = None  # image-reading families: input side the crops come from (None: the base's)
    init: str = "base"  # with the base's family and config: its weights ("base") or a fresh start

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


def train(base: Bundle, data: Dataset, recipe: KeypointRecipe, out: Path, work: Path | None = None) -> Bundle:
    """Train the keypoint net on ``data`` and write ``out``: ``base`` with that net. The base's own
    net is fine-tuned when it has the recipe's family and config, else a new one is trained."""
    old = base.keypoints
    family = keypoint_family(recipe.arch or old.arch)
    same_family = keypoint_family(old.arch) is family
    s = setup(base, data, "keypoints", recipe)
    d = instance_data(base, s, embed=family.reads == "embedding")  # a net on image crops needs no embeddings
    pre = None
    if family.reads == "image":
        config = dict(old.config) if same_family else family.default_config()
        config.pop("members", None)  # from an ensemble base, train one fresh member
        config.update({k: v for k, v in (("backbone", recipe.backbone), ("crop_size", recipe.crop)) if v})
        pre = PreprocessConfig(image_size=recipe.size or (old.preprocess or base.preprocess).image_size)
    else:
        emb = s.val.embeddings
        config = old.config if same_family else family.default_config(
            channels=emb.shape[1], stride=base.preprocess.image_size // emb.shape[-1])
    entry = stage_entry(family.name, config, family.reads, pre.to_dict() if pre else None)
    spec = dataclasses.replace(base, keypoints=StageSpec(family.name, config, family.reads, None, None, pre))
    fine_tune = same_family and old.config == config and recipe.init == "base"
    net = s.val.models.keypoints if fine_tune else build_keypoint_net(family.name, config,
                                                                      BuildContext(base.prompt.text, base.root))
    if recipe.backbone_checkpoint:
        load_backbone(net, recipe.backbone_checkpoint)
    elif not fine_tune:
        imagenet_start(net)
    targets, features = d.targets, d.embeddings
    if family.reads == "image":
        targets = instance_targets(d.samples, pre.image_size, s.val.models.box.mask_input_size[0])
        features = image_reader(d.samples, pre)
    epoch = make_keypoint_epoch(targets, features, recipe.batch_size, recipe.seed, float(config["margin"]),
                                sigma=float(config.get("sigma", 1.5)))
    state = fit("keypoints", net, list(net.parameters()), epoch, lambda m: validate_head(spec, "keypoints", m, s.val),
                recipe, work_dir(out, work), metric_name("keypoints"), data.progress)
    return finish(base, "keypoints", s, recipe, out, {"keypoints": (entry, state)})
