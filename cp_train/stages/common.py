"""What every stage shares: reading the data once, embedding it, and writing the bundle it trained."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy import __version__
from cp_deploy.bundle import Bundle, derive_bundle, load_bundle
from cp_deploy.models.build import build_models
from cp_deploy.models.efficientnet import load_lite0_features
from cp_train import distributed
from cp_train.data import Dataset, EmbeddingCache, Sample, encoder_id
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


def plan_line(stage: str, data: Dataset, recipe: LoopConfig, train_names: list[str], val_names: list[str],
              cache_dir: Path | None) -> str:
    """What a stage is about to do, printed before any image is read: the images it trains and
    validates on, its epochs, and where the embeddings go and how many are there already."""
    carved_train, carved_val = data.carved_sizes()
    cap = f" (--max-images {data.max_images} caps both)" if data.max_images else ""
    line = (f"[{stage}] plan: {len(train_names)} of {carved_train} training and {len(val_names)} of {carved_val} "
            f"validation images{cap}, {recipe.epochs} epoch(s); ")
    if cache_dir is None:
        return line + "no embedding cache (validation on the detector's boxes)"
    names = [*train_names, *val_names]
    cached = sum((cache_dir / f"{n}.pt").is_file() for n in names)
    reuse = "reused" if cached == len(names) else "partly reused" if cached else "new"
    return (line + f"embedding cache {cache_dir} ({reuse}: {cached} of {len(names)} images cached, "
            f"{len(names) - cached} to encode; --cache-dir moves it)")


def setup(base: Bundle, data: Dataset, stage: str, recipe: LoopConfig, sam: bool = True) -> Setup:
    """Print the stage's plan, carve the split and load the validation samples; with ``sam`` also
    build the base bundle's networks and embed the validation samples (a detector validated on its
    boxes needs neither)."""
    started = time.perf_counter()
    train_names, val_names = data.names()
    if distributed.is_main():
        cache_dir = Path(data.cache_dir) / encoder_id(base) if sam else None
        print(plan_line(stage, data, recipe, train_names, val_names, cache_dir), flush=True)
    samples = data.load(val_names)
    if not sam:
        return Setup(data, train_names, val_names, ValidationSet(samples, progress=data.progress), None, started)
    models = build_models(base)
    cache = EmbeddingCache(data.cache_dir, base, models.image_encoder)
    with torch.no_grad():
        embeddings = cache.fill(samples, progress=data.progress)
    return Setup(data, train_names, val_names, ValidationSet(samples, models, embeddings, data.progress), cache,
                 started)


def imagenet_start(net: nn.Module) -> None:
    """Start ``net``'s backbone from the ImageNet weights of the pip package where it is timm's
    EfficientNet-Lite0 (those weights need no download); other backbones keep their initialisation."""
    backbone = getattr(net, "backbone", None)
    if getattr(backbone, "pretrained_cfg", {}).get("architecture") == "efficientnet_lite0":
        load_lite0_features(backbone)


def finish(base: Bundle, stage: str, s: Setup, recipe: LoopConfig, out: Path,
           replace: dict[str, tuple[dict | None, nn.Module | dict]], prompt: dict | None = None) -> Bundle:
    """Write ``out``: ``base`` with ``replace``'s stages and the run recorded in its metadata (rank 0
    alone); every rank then reads it, so the next stage starts from it.

    The metadata's ``description`` is rewritten to say what cp-train did, and the base's
    ``examples`` score is dropped: both described the base's networks (``cp-train evaluate``
    scores the new bundle)."""
    run = {"data": Path(s.data.root).name, "split": Path(s.data.split).name,
           "train_images": len(s.train_names), "val_images": len(s.val_names),
           "max_images": s.data.max_images, "epochs": recipe.epochs,
           "seconds": round(time.perf_counter() - s.started), "date": time.strftime("%Y-%m-%d"),
           "curriculum_prompting_version": __version__,
           "recipe": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(recipe).items()}}
    new = {"trained": True, f"trained_{stage}": run}
    meta = {**base.metadata, **new, "examples": None}
    meta["description"] = describe(base.name, meta)
    bundle = None
    if distributed.is_main():
        bundle = derive_bundle(base, out, replace, metadata=meta, prompt=prompt)
        print(f"[{stage}] wrote bundle {out} in {time.perf_counter() - s.started:.0f} s")
    distributed.barrier()
    return bundle if bundle is not None else load_bundle(out)


def describe(base_name: str, meta: dict) -> str:
    """The description of a bundle cp-train wrote: every stage this cp-train trained into it (the
    ``trained_*`` entries with a date), on what, when and with which version."""
    runs = [(k[len("trained_"):], v) for k, v in meta.items()
            if k.startswith("trained_") and isinstance(v, dict) and "date" in v]
    done = "; ".join(f"{stage} retrained on {r['data']} ({r['split']}: {r['train_images']} training, "
                     f"{r['val_images']} validation images, {r['epochs']} epoch(s)) on {r['date']} by "
                     f"curriculum-prompting {r['curriculum_prompting_version']}" for stage, r in runs)
    return (f"'{base_name}' with {done}. The other stages are the base bundle's; metadata trained_<stage> "
            "holds each run's recipe. Not scored on the examples yet: run cp-train evaluate.")


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
