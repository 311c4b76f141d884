"""What every stage shares: reading the data once, embedding it, and writing the bundle it trained."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import Bundle, derive_bundle, load_bundle
from cp_deploy.models.build import build_models
from cp_deploy.models.efficientnet import load_lite0_features
from cp_train import distributed
from cp_train.data import Dataset, EmbeddingCache, Sample
from cp_train.trainers.loop import LoopConfig
from cp_train.trainers.sam import InstanceTargets, instance_targets
from cp_train.validate import ValidationSet


def work_dir(out: Path, work: Path | None) -> Path:
    """Where a stage keeps its checkpoints and logs: ``work``, by default OUT-work."""
    return Path(work) if work is not None else Path(f"{out}-work")


@dataclass
class Setup:
    """A stage's data, read once: the carved names, the validation set and, where SAM runs, the
    embedding cache."""

    data: Dataset
    train_names: list[str]
    val_names: list[str]
    val: ValidationSet
    cache: EmbeddingCache | None
    started: float

    def embed(self, samples: list[Sample]) -> torch.Tensor:
        """The cached embeddings of ``samples``, computing the missing ones."""
        with torch.no_grad():
            return self.cache.fill(samples, progress=self.data.progress)


def setup(base: Bundle, data: Dataset, sam: bool = True) -> Setup:
    """Carve the split and load the validation samples; with ``sam`` also build the base bundle's
    networks and embed the validation samples (a detector validated on its boxes needs neither)."""
    started = time.perf_counter()
    train_names, val_names = data.names()
    samples = data.load(val_names)
    if not sam:
        return Setup(data, train_names, val_names, ValidationSet(samples), None, started)
    models = build_models(base)
    cache = EmbeddingCache(data.cache_dir, base, models.image_encoder)
    with torch.no_grad():
        embeddings = cache.fill(samples, progress=data.progress)
    return Setup(data, train_names, val_names, ValidationSet(samples, models, embeddings), cache, started)


def imagenet_start(net: nn.Module) -> None:
    """Start ``net``'s backbone from the ImageNet weights of the pip package where it is timm's
    EfficientNet-Lite0 (those weights need no download); other backbones keep their initialisation."""
    backbone = getattr(net, "backbone", None)
    if getattr(backbone, "pretrained_cfg", {}).get("architecture") == "efficientnet_lite0":
        load_lite0_features(backbone)


def finish(base: Bundle, stage: str, s: Setup, recipe: LoopConfig, out: Path,
           replace: dict[str, tuple[dict | None, nn.Module | dict]], prompt: dict | None = None) -> Bundle:
    """Write ``out``: ``base`` with ``replace``'s stages and the run recorded in its metadata (rank 0
    alone); every rank then reads it, so the next stage starts from it."""
    meta = {f"trained_{stage}": {"data": Path(s.data.root).name, "split": Path(s.data.split).name,
                                  "train_images": len(s.train_names), "val_images": len(s.val_names),
                                  "epochs": recipe.epochs, "seconds": round(time.perf_counter() - s.started)}}
    if distributed.is_main():
        derive_bundle(base, out, replace, metadata={"trained": True, **meta}, prompt=prompt)
        print(f"[{stage}] wrote bundle {out} in {time.perf_counter() - s.started:.0f} s")
    distributed.barrier()
    return load_bundle(out)


@dataclass
class InstanceData:
    """The training samples of a SAM-side stage, their embeddings (``None`` where the net reads
    the image) and their instances' targets in the SAM frame."""

    samples: list[Sample]
    embeddings: torch.Tensor | None
    targets: InstanceTargets


def instance_data(base: Bundle, s: Setup, embed: bool = True) -> InstanceData:
    """Load, embed (with ``embed``) and take the instance targets of the training samples."""
    samples = s.data.load(s.train_names)
    embeddings = s.embed(samples) if embed else None
    low = s.val.models.box.mask_input_size[0]
    return InstanceData(samples, embeddings, instance_targets(samples, base.preprocess.image_size, low))
