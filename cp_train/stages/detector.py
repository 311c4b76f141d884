"""The detector stage: any registered detector family trained through its own loss, then its
score threshold and instance counts tuned on the validation split."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import Bundle, StageSpec
from cp_deploy.errors import RecipeError
from cp_deploy.models.build import stage_entry
from cp_deploy.models.registry import BuildContext, DetectorFamily, build_detector, detector_family
from cp_deploy.preprocess import PreprocessConfig
from cp_train import defaults
from cp_train.data import Dataset
from cp_train.stages.common import Setup, finish, setup, work_dir
from cp_train.trainers.detector import embedding_batches, image_batches, make_train_epoch
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.validate import metric_name, tune_detection, validate_detector


@dataclass
class DetectorRecipe(LoopConfig):
    """How to train the detector; the loop's fields (epochs, lr, seed, ema...) plus these."""

    epochs: int = defaults.STAGE_EPOCHS["detector"]
    batch_size: int = 16
    lr: float = 5e-4
    arch: str = defaults.DETECTOR_ARCH  # a registered detector family
    size: int = defaults.DETECTOR_SIZE  # input side of a detector that reads the image
    backbone: str | None = None  # the family's ``backbone`` config key (lite0_centernet's); None: its default
    freeze: int = defaults.DETECTOR_FREEZE  # backbone stages after the stem kept at their ImageNet weights (0: none)
    val_metric: str = "sam"  # "sam": the box pass's mDice; "boxes": the boxes' Dice, no SAM
    giou: float = 0.0  # CenterNet families: weight of the GIoU term
    device: str = "cpu"
    workers: int = 1  # threads augmenting the training images
    shift: float = 0.0  # probability of the domain shift on a training image (cp_train/shift.py)
    weights: Path | None = None  # a family's own starting weights (Grounding DINO's folder)


def train(base: Bundle, data: Dataset, recipe: DetectorRecipe, out: Path, work: Path | None = None) -> Bundle:
    """Train ``recipe.arch`` on ``data`` and write ``out``: ``base`` with that detector and the
    prompt thresholds tuned on validation."""
    family = detector_family(recipe.arch)
    if recipe.val_metric == "boxes" and (family.reads != "image" or family.text_prompted):
        raise RecipeError(f"box validation is for detectors that read the image alone; {family.name} does not")
    options = {"giou": recipe.giou} if recipe.giou else {}
    if options and "giou" not in inspect.signature(family.loss).parameters:
        raise RecipeError(f"--giou is for detectors whose loss has a GIoU term (CenterNet's); {family.name}'s has "
                          "its own, so drop --giou")
    if recipe.backbone is not None:
        if "backbone" not in inspect.signature(family.default_config).parameters:
            raise RecipeError(f"--detector-backbone is for detectors with a backbone (lite0_centernet); {family.name} "
                              "has none, so drop it")
        try:
            family.default_config(backbone=recipe.backbone)
        except ValueError as e:  # the family's message lists the known backbones
            raise RecipeError(f"--detector-backbone {recipe.backbone}: {e}") from None
    work = work_dir(out, work)
    s = setup(base, data, "detector", recipe, sam=recipe.val_metric == "sam")
    net, config, pre = _start(base, family, recipe, s)
    spec = dataclasses.replace(base, detector=StageSpec(family.name, config, family.reads, None, None, pre))
    frozen = _freeze(net, recipe.freeze)
    if family.reads == "image":
        train_set = data.load(s.train_names, max_side=pre.image_size)
        batches = image_batches(train_set, pre, workers=recipe.workers, shift=recipe.shift)
    else:
        train_set = data.load(s.train_names)
        batches = embedding_batches(train_set, s.embed(train_set), base.preprocess)
    device = torch.device(recipe.device)
    net.to(device)
    epoch_fn = make_train_epoch(len(train_set), batches, recipe.batch_size, recipe.seed,
                                lambda m, x, boxes: family.loss(m, x, boxes, **options), device)

    def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> float:
        for m in frozen:
            m.eval()  # keep ImageNet BatchNorm statistics in the frozen stages
        return epoch_fn(model, opt, epoch)

    params = [p for p in net.parameters() if p.requires_grad]
    state = fit("detector", net, params, train_epoch,
                lambda m: validate_detector(spec, m, s.val, recipe.val_metric, device), recipe, work,
                metric_name("detector", recipe.val_metric), data.progress)
    net.load_state_dict(state)
    tuned = tune_detection(spec, net, s.val, recipe.val_metric, device, log=work / "detector" / "tuning.jsonl")
    entry = stage_entry(family.name, config, family.reads, pre.to_dict() if pre else None)
    return finish(base, "detector", s, recipe, out, {"detector": (entry, {k: v.cpu() for k, v in state.items()})},
                  prompt=tuned)


def _start(base: Bundle, family: DetectorFamily, recipe: DetectorRecipe, s: Setup
           ) -> tuple[nn.Module, dict, PreprocessConfig | None]:
    """The net to train with its bundle config and preprocessing: from ``recipe.weights``, or
    the base's own when it holds a net of this text-prompted family (whose weights are the point),
    else a fresh net of the family's default config (ImageNet backbone where there is one)."""
    if family.text_prompted:
        return _text_prompted_start(base, family, recipe, s)
    if family.reads == "image":
        config = family.default_config(**({} if recipe.backbone is None else {"backbone": recipe.backbone}))
        pre = PreprocessConfig(image_size=recipe.size, normalize="meanstd")
    else:
        emb = s.val.embeddings
        config = family.default_config(channels=emb.shape[1], stride=base.preprocess.image_size // emb.shape[-1])
        pre = None
    return _fresh(family, config, BuildContext(base.prompt.text, base.root)), config, pre


def _fresh(family: DetectorFamily, config: dict, ctx: BuildContext) -> nn.Module:
    """A new net of ``config``, its backbone from ImageNet where the family's net takes
    ``pretrained`` (a training start, never stored in a bundle). Loading those weights while the
    net is built, before its head is initialised, keeps a seeded run's initialisation."""
    try:
        return build_detector(family.name, {**config, "pretrained": True}, ctx)
    except TypeError:  # the family's net has no ImageNet start
        return build_detector(family.name, config, ctx)


def _text_prompted_start(base: Bundle, family: DetectorFamily, recipe: DetectorRecipe, s: Setup
                         ) -> tuple[nn.Module, dict, PreprocessConfig]:
    if recipe.weights is not None:
        config = {"pretrained": str(Path(recipe.weights).resolve())}
        pre = PreprocessConfig(image_size=recipe.size, normalize="meanstd")
        return build_detector(family.name, config, BuildContext(base.prompt.text)), config, pre
    if detector_family(base.detector.arch) is not family:
        raise RecipeError(f"{base.root}: the --base bundle has no {family.name}; pass --gdino-weights DIR (a local "
                          f"{family.name} directory, e.g. grounding-dino-tiny) or a --base bundle with one")
    config = dict(base.detector.config)
    for key in ("tokenizer", "pretrained"):  # the new bundle lives elsewhere: absolute paths
        if config.get(key) is not None:
            config[key] = str((base.root / config[key]).resolve())
    return s.val.models.detector, config, base.detector.preprocess or base.preprocess


def _freeze(net: nn.Module, stages: int) -> list[nn.Module]:
    """Freeze the stem and first ``stages`` blocks of a timm EfficientNet backbone (generic ImageNet
    edges and textures, and half the backward pass on a CPU); returns the frozen modules."""
    backbone = getattr(net, "backbone", None)
    if not stages or not hasattr(backbone, "conv_stem"):
        return []
    frozen = [backbone.conv_stem, backbone.bn1, *backbone.blocks[:stages]]
    for m in frozen:
        m.requires_grad_(False)
    return frozen
