"""``cp-train``: maps flags to the training library's recipes and runs it.

    cp-train detector|sam-box|sam-refine|keypoints|all --data DIR --split FILE --out BUNDLE ...
    cp-train ensemble RUN1 RUN2 ... --out BUNDLE [--stage detector|keypoints] [--data DIR --split FILE]
    cp-train evaluate --bundle BUNDLE [--examples DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from cp_deploy.bundle import BUNDLE_FILE, default_bundle_path, load_bundle, update_spec
from cp_deploy.errors import CPError, UsageError
from cp_deploy.models.registry import detector_families, detector_family, keypoint_families, keypoint_family
from cp_train import distributed
from cp_train.data import DEFAULT_CACHE_DIR, Dataset
from cp_train.ensemble import ensemble_bundles, tune
from cp_train.evaluate import record_examples
from cp_train.stages import STAGES, train_stages
from cp_train.stages.detector import DetectorRecipe
from cp_train.stages.keypoints import KeypointRecipe
from cp_train.stages.sam_box import SamBoxRecipe
from cp_train.stages.sam_refine import SamRefineRecipe
from cp_train.trainers.loop import LoopConfig

# Mistakes in what the user passed: one line and exit 2, never a traceback.
KEYPOINT_IMAGE_FLAGS = ("backbone", "backbone_checkpoint", "crop", "size")


def _names(families: dict) -> list[str]:
    """Every family name and alias, for a flag's choices."""
    return [n for name, f in families.items() for n in (name, *f.aliases)]


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    defaults = {s.name: s.recipe() for s in STAGES.values()}
    p.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    p.add_argument("--split", required=True, help="file of training names (validation is carved from it)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", default=None, help="bundle to start from (default: the shipped default bundle)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default per stage: " +
                   ", ".join(f"{k} {r.epochs}" for k, r in defaults.items()) + ")")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 16 detector/keypoints, 4 SAM)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-4 for SAM heads)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --split held out for validation")
    p.add_argument("--max-images", type=int, default=0, help="train on at most this many images (0: all)")
    p.add_argument("--detector-arch", default=DetectorRecipe.arch, choices=_names(detector_families()),
                   help="detector family: EfficientNet-Lite0 on the image, a head on the SAM embedding, or Grounding "
                   "DINO prompted with the bundle's prompt.text")
    p.add_argument("--gdino-weights", default=None,
                   help="local Grounding DINO directory (config.json, weights, tokenizer) to fine-tune from; "
                   "default: the --base bundle's Grounding DINO")
    p.add_argument("--detector-size", type=int, default=DetectorRecipe.size,
                   help="detector input size (longest side)")
    p.add_argument("--detector-freeze", type=int, default=DetectorRecipe.freeze,
                   help="lite0_centernet: backbone stages kept frozen at their ImageNet weights, after the stem "
                        "(0: train all)")
    p.add_argument("--val-metric", default="sam", choices=["sam", "boxes"],
                   help="detector validation and threshold tuning: mDice of SAM's box pass (sam), or Dice of "
                        "the boxes against the GT boxes (boxes: needs no SAM weights, for image-reading detectors)")
    p.add_argument("--giou", type=float, default=0.0,
                   help="CenterNet detectors: weight of a GIoU loss on the decoded centre-cell boxes, next to "
                        "the L1 on log size and offset (0: off)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="validate and keep an exponential moving average of the weights with this decay per "
                        "step, e.g. 0.99 (0: the raw weights)")
    p.add_argument("--device", default="cpu", help="detector stage: cpu, cuda or cuda:N (other stages: cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="threads that augment the detector's training images (more keep a GPU fed)")
    p.add_argument("--point-jitter", type=float, default=SamRefineRecipe.point_jitter,
                   help="sam-refine: Gaussian noise on the training edge points, as a fraction of the box side "
                        "(match it to the keypoint net's error)")
    p.add_argument("--refine-train-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine training: ground-truth edge points, or the base bundle's keypoint net's points "
                        "on each jittered box (the errors the deployed curriculum sees), both plus --point-jitter")
    p.add_argument("--refine-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine validation: ground-truth edge points, or those of the base bundle's keypoint "
                        "net (what the deployed curriculum sees; needs a trained keypoint net)")
    p.add_argument("--keypoint-arch", default=None, choices=_names(keypoint_families()),
                   help="keypoint family: a heatmap head on the SAM embedding, or the top-down net on image crops "
                        "(topdown_heatmap, alias hrnet: HRNet or another timm backbone such as efficientnet_lite0); "
                        "default: the base bundle's")
    p.add_argument("--keypoint-backbone", default=None,
                   help="timm backbone of an image-reading keypoint net (default hrnet_w32; hrnet_w18_small is "
                        "small; efficientnet_lite0 starts from the pip package's ImageNet weights)")
    p.add_argument("--keypoint-backbone-checkpoint", default=None,
                   help="local timm checkpoint (e.g. HRNet's ImageNet one) to start that backbone from")
    p.add_argument("--keypoint-init", default="base", choices=["base", "fresh"],
                   help="keypoint net with the base bundle's arch and config: fine-tune the base's weights (base), "
                        "or start afresh (backbone from ImageNet where it has such weights), e.g. for another "
                        "ensemble member")
    p.add_argument("--keypoint-crop", type=int, default=None,
                   help="image-reading keypoint net: crop side in pixels, a multiple of 32 (default 256; heatmaps "
                        "are 1/4 of it)")
    p.add_argument("--keypoint-size", type=int, default=None,
                   help="image-reading keypoint net: input size (longest side) the crops are taken from "
                        "(default: the SAM's)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="embedding cache folder")
    p.add_argument("--work-dir", default=None, help="checkpoints and logs (default: OUT-work)")
    p.add_argument("--resume", action="store_true", help="continue each stage from its last saved epoch")
    p.add_argument("--seed", type=int, default=0, help="random seed (also of the validation split, unless --val-seed)")
    p.add_argument("--val-seed", type=int, default=None,
                   help="seed of the carved validation split alone, e.g. to train ensemble members with different "
                        "--seed on the same split")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_ensemble_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("members", nargs="+", help="trained bundle directories whose nets to fuse")
    p.add_argument("--stage", default="detector", choices=["detector", "keypoints"], help="which net to fuse")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", default=None, help="bundle to take every other stage from (default: the first member)")
    p.add_argument("--data", default=None, help="dataset folder, to re-tune the score threshold on validation")
    p.add_argument("--split", default=None, help="the training split the members were trained on (with --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="as given to cp-train")
    p.add_argument("--seed", type=int, default=0, help="as given to cp-train (it picks the validation split)")
    p.add_argument("--val-metric", default="boxes", choices=["boxes", "sam"],
                   help="tune on the boxes' Dice (no SAM) or on the box pass's mDice")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="embedding cache folder (--val-metric sam)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cp-train", description="Fine-tune the curriculum's four models into a bundle.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help=f"a stage to train ({', '.join(STAGES)}), 'all' (the four in order), 'ensemble' "
                                "or 'evaluate'")
    for name in (*STAGES, "all"):
        _add_training_flags(sub.add_parser(name, help="train the four stages in order" if name == "all"
                                           else f"train the {name} stage"))
    _add_ensemble_flags(sub.add_parser("ensemble", help="fuse the detectors (or keypoint nets) of trained bundles "
                                       "into one bundle, optionally re-tuning its thresholds on validation"))
    ev = sub.add_parser("evaluate", help="record a bundle's curriculum mDice on an images/ + masks/ folder in "
                        "its metadata")
    ev.add_argument("--bundle", required=True, help="bundle directory to update")
    ev.add_argument("--examples", default="examples", help="folder with images/ and masks/")
    return p


def dataset_from(args: argparse.Namespace) -> Dataset:
    """The training flags' :class:`Dataset`."""
    return Dataset(Path(args.data), Path(args.split), val_fraction=args.val_fraction,
                   val_seed=args.seed if args.val_seed is None else args.val_seed, max_images=args.max_images,
                   cache_dir=Path(args.cache_dir), progress=not args.no_progress and distributed.is_main())


def recipes_from(args: argparse.Namespace) -> dict[str, LoopConfig]:
    """The recipe of every stage the command trains, from its flags (unset ones: the recipe's default)."""
    loop = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v}
    loop.update(seed=args.seed, ema=args.ema, resume=args.resume)
    path = lambda v: None if v is None else Path(v)  # noqa: E731
    recipes = {
        "detector": DetectorRecipe(**loop, arch=args.detector_arch, size=args.detector_size,
                                   freeze=args.detector_freeze, val_metric=args.val_metric, giou=args.giou,
                                   device=args.device, workers=args.workers, weights=path(args.gdino_weights)),
        "sam-box": SamBoxRecipe(**loop),
        "sam-refine": SamRefineRecipe(**loop, point_jitter=args.point_jitter, train_points=args.refine_train_points,
                                      val_points=args.refine_points),
        "keypoints": KeypointRecipe(**loop, arch=args.keypoint_arch, backbone=args.keypoint_backbone,
                                    backbone_checkpoint=path(args.keypoint_backbone_checkpoint),
                                    crop=args.keypoint_crop, size=args.keypoint_size, init=args.keypoint_init),
    }
    return recipes if args.command == "all" else {args.command: recipes[args.command]}


def main(argv: list[str] | None = None) -> int:
    """Also the entry point of every rank under ``torchrun --nproc-per-node N``: ``--batch-size``
    is then per rank (the global batch is N times it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ensemble" and (args.data is None) != (args.split is None):
        parser.error("--data and --split go together")
    if args.command == "ensemble" and args.data and args.stage != "detector":
        parser.error("--data/--split re-tune a detector's threshold; keypoints have none")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    created = distributed.init_from_env()
    try:
        result = {"ensemble": _ensemble, "evaluate": _evaluate}.get(args.command, _train)(args)
        if distributed.is_main():  # asked before shutdown, which makes every rank look like rank 0
            print(json.dumps(result))
    except CPError as e:
        print(f"cp-train: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if created:
            distributed.shutdown()
    return 0


def _train(args: argparse.Namespace) -> dict:
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


def _check_flags(args: argparse.Namespace, base, stages: list[str]) -> None:
    """Flags that the stages trained would ignore, or that cannot go together."""
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


def _check_paths(args: argparse.Namespace) -> None:
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


def _ensemble(args: argparse.Namespace) -> dict:
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


def _evaluate(args: argparse.Namespace) -> dict:
    return record_examples(args.bundle, args.examples)


if __name__ == "__main__":
    sys.exit(main())
