"""The bodies of ``cp-train``'s commands, run after :mod:`cp_train.cli` has parsed the flags: this
module imports torch and the training library, the parser does not."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cp_deploy.bundle import BUNDLE_FILE, default_bundle_path, load_bundle, update_spec
from cp_deploy.devices import resolve_device
from cp_deploy.errors import UsageError, run_command
from cp_deploy.models.registry import detector_family, keypoint_family
from cp_train import distributed
from cp_train.data import Dataset
from cp_train.ensemble import ensemble_bundles, tune
from cp_train.evaluate import record_examples
from cp_train.stages import train_stages
from cp_train.stages.detector import DetectorRecipe
from cp_train.stages.keypoints import KeypointRecipe
from cp_train.stages.sam_box import SamBoxRecipe
from cp_train.stages.sam_refine import SamRefineRecipe
from cp_train.trainers.loop import LoopConfig

# The flags the CLI module parsed (an Flags); argparse itself stays in the CLI modules.
Flags = Any

# Mistakes in what the user passed: one line and exit 2, never a traceback.
KEYPOINT_IMAGE_FLAGS = ("backbone", "backbone_checkpoint", "crop", "size")


def run(args: Flags) -> int:
    """Run the parsed command on this rank; prints its result as JSON on rank 0."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None) == "auto":
        args.device = train_device(args)
    created = distributed.init_from_env()
    def command() -> int:
        result = {"ensemble": _ensemble, "evaluate": _evaluate}.get(args.command, _train)(args)
        if distributed.is_main():  # asked before shutdown, which makes every rank look like rank 0
            print(json.dumps(result))
        return 0

    try:
        return run_command("cp-train", command)
    finally:
        if created:
            distributed.shutdown()


def dataset_from(args: Flags) -> Dataset:
    """The training flags' :class:`Dataset`."""
    return Dataset(Path(args.data), Path(args.split), val_fraction=args.val_fraction,
                   val_seed=args.seed if args.val_seed is None else args.val_seed, max_images=args.max_images,
                   cache_dir=Path(args.cache_dir), progress=not args.no_progress and distributed.is_main())


def train_device(args: Flags) -> str:
    """``--device`` resolved: ``auto`` is a GPU where torch sees one for the detector stage alone,
    the one stage that trains on a GPU so far, and the cpu for the others."""
    if args.device != "auto":
        return args.device
    return resolve_device("auto") if args.command == "detector" else "cpu"


def recipes_from(args: Flags) -> dict[str, LoopConfig]:
    """The recipe of every stage the command trains, from its flags (unset ones: the recipe's default)."""
    loop = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v}
    loop.update(seed=args.seed, ema=args.ema, resume=args.resume)
    path = lambda v: None if v is None else Path(v)  # noqa: E731
    recipes = {
        "detector": DetectorRecipe(**loop, arch=args.detector_arch, size=args.detector_size,
                                   backbone=args.detector_backbone, freeze=args.detector_freeze,
                                   val_metric=args.val_metric, giou=args.giou,
                                   device=train_device(args), workers=args.workers, shift=args.shift_aug,
                                   weights=path(args.gdino_weights)),
        "sam-box": SamBoxRecipe(**loop),
        "sam-refine": SamRefineRecipe(**loop, point_jitter=args.point_jitter, train_points=args.refine_train_points,
                                      val_points=args.refine_points, train_boxes=args.refine_train_boxes,
                                      val_boxes=args.refine_val_boxes, box_jitter=args.box_jitter),
        "keypoints": KeypointRecipe(**loop, arch=args.keypoint_arch, backbone=args.keypoint_backbone,
                                    backbone_checkpoint=path(args.keypoint_backbone_checkpoint),
                                    crop=args.keypoint_crop, size=args.keypoint_size, init=args.keypoint_init),
    }
    return recipes if args.command == "all" else {args.command: recipes[args.command]}


def _train(args: Flags) -> dict:
    base_dir = Path(args.base) if args.base else default_bundle_path()
    if not (base_dir / BUNDLE_FILE).is_file():
        fix = "pass --base a bundle directory" if args.base else "reinstall the package or pass --base a bundle"
        raise UsageError(f"{base_dir}: no {BUNDLE_FILE} there, so it is not a bundle; {fix}")
    base = load_bundle(base_dir)  # checks the rest of the bundle before any work starts
    recipes = recipes_from(args)
    _check_flags(args, base, list(recipes))
    data = dataset_from(args)
    data.check()
    _check_paths(args)
    train_stages(base, data, recipes, Path(args.out), Path(args.work_dir) if args.work_dir else None)
    return {"bundle": str(args.out), "stages": list(recipes)}


def _check_flags(args: Flags, base, stages: list[str]) -> None:
    """Flags that the stages trained would ignore, or that cannot go together."""
    for flag, lookup, name in (("--detector-arch", detector_family, args.detector_arch),
                               ("--keypoint-arch", keypoint_family, args.keypoint_arch)):
        try:
            if name is not None:
                lookup(name)
        except ValueError as e:  # the registry's message lists the known families
            raise UsageError(f"{flag} {name}: {e}; pass one of those") from None
    image_flags = [f"--keypoint-{k.replace('_', '-')}" for k in KEYPOINT_IMAGE_FLAGS if getattr(args, f"keypoint_{k}")]
    kp_reads = keypoint_family(args.keypoint_arch or base.keypoints.arch).reads
    if image_flags and "keypoints" in stages and kp_reads != "image":
        raise UsageError(f"{', '.join(image_flags)} need an image-reading --keypoint-arch (topdown_heatmap); add it "
                         "or drop them")
    family = detector_family(args.detector_arch)
    if args.val_metric == "boxes" and (stages != ["detector"] or family.reads != "image" or family.text_prompted):
        raise UsageError("--val-metric boxes is for the detector stage with a detector that reads the image alone "
                         "(e.g. lite0_centernet); drop it for the other stages")
    if args.device != "cpu" and stages != ["detector"]:
        raise UsageError("--device other than cpu is for the detector stage only, so far; use --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")


def _check_paths(args: Flags) -> None:
    """The output folders and the given weights, checked before any model is built or embedding
    computed, so a typo costs a second and not a stage."""
    outputs = [(Path(args.out), "--out"), (Path(args.work_dir or f"{args.out}-work"), "--work-dir")]
    if args.val_metric == "sam":  # box validation of a detector reads no embeddings
        outputs.append((Path(args.cache_dir), "--cache-dir"))
    for path, flag in outputs:
        _check_writable(path, flag)
    for given, flag, is_kind, kind in ((args.gdino_weights, "--gdino-weights", Path.is_dir, "folder"),
                                       (args.keypoint_backbone_checkpoint, "--keypoint-backbone-checkpoint",
                                        Path.is_file, "file")):
        if given and not is_kind(Path(given)):
            raise UsageError(f"{given}: no such {kind}; pass {flag} an existing local {kind}")


def _check_writable(path: Path, flag: str) -> None:
    """``path`` is a folder that can be written, or can be created where its nearest existing
    ancestor is a writable folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{path}: cannot be a folder, {probe} is a file; pass {flag} another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot be written ({probe} is read-only for this user); pass {flag} a "
                         "writable folder")


def _ensemble(args: Flags) -> dict:
    try:
        members = [load_bundle(m) for m in args.members]
        bundle = ensemble_bundles(members, args.out, args.stage, load_bundle(args.base) if args.base else None)
        prompt = None
        if args.data:
            data = Dataset(Path(args.data), Path(args.split), val_fraction=args.val_fraction, val_seed=args.seed,
                           cache_dir=Path(args.cache_dir), progress=False)
            prompt = tune(bundle, data, args.val_metric)
            update_spec(args.out, "prompt", prompt)
    except ValueError as e:  # members that cannot be fused
        raise UsageError(str(e)) from None
    return {"bundle": args.out, "stage": args.stage, "members": len(members), "tuned": prompt}


def _evaluate(args: Flags) -> dict:
    return record_examples(args.bundle, args.examples)

