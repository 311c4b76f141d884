"""``cp-train``: maps flags to the training library's recipes and runs it.

    cp-train detector|sam-box|sam-refine|keypoints|all --data DIR --split FILE --out BUNDLE ...
    cp-train ensemble RUN1 RUN2 ... --out BUNDLE [--stage detector|keypoints] [--data DIR --split FILE]
    cp-train evaluate --bundle BUNDLE [--examples DIR]

Only argparse-level modules are imported here, so ``--help`` and ``--version`` answer without
loading torch; the command bodies live in :mod:`cp_train.commands`, imported once the flags parse.
"""

from __future__ import annotations

import argparse
import sys

from cp_deploy import cli as common
from cp_train import defaults


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    p.add_argument("--split", required=True, help="file of training names (validation is carved from it)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", default=None, help="bundle to start from (default: the shipped default bundle)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default per stage: " +
                   ", ".join(f"{k} {n}" for k, n in defaults.STAGE_EPOCHS.items()) + ")")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 16 detector/keypoints, 4 SAM)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-4 for SAM heads)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --split held out for validation")
    p.add_argument("--max-images", type=int, default=0,
                   help="train on at most this many images and validate on at most max(N // 4, 5) (0: all)")
    p.add_argument("--detector-arch", default=defaults.DETECTOR_ARCH, metavar="ARCH",
                   help="a registered detector family: lite0_centernet (EfficientNet-Lite0 on the image), "
                   "embedding_centernet (a head on the SAM embedding) or grounding_dino (prompted with the bundle's "
                   "prompt.text)")
    p.add_argument("--gdino-weights", default=None,
                   help="local Grounding DINO directory (config.json, weights, tokenizer) to fine-tune from; "
                   "default: the --base bundle's Grounding DINO")
    p.add_argument("--detector-size", type=int, default=defaults.DETECTOR_SIZE,
                   help="detector input size (longest side)")
    p.add_argument("--detector-backbone", default=None, metavar="NAME",
                   help="lite0_centernet: its timm backbone, efficientnet_lite0 (default), efficientnet_lite1 or "
                        "efficientnet_lite2 (larger and slower; ImageNet weights from their pip packages); "
                        "tf_efficientnet_liteN pads as the weights were trained")
    p.add_argument("--detector-freeze", type=int, default=defaults.DETECTOR_FREEZE,
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
    p.add_argument("--device", default="auto", type=common.device,
                   help=f"detector stage: {common.DEVICE_HELP}; the other stages train on the cpu")
    p.add_argument("--shift-aug", type=float, default=0.0,
                   help="detector: probability of the domain shift (cp_train/shift.py: another endoscope's "
                        "light, highlights, blur, JPEG, border and text, aspect ratio) on a training image")
    p.add_argument("--workers", type=int, default=1,
                   help="threads that augment the detector's training images (more keep a GPU fed)")
    p.add_argument("--point-jitter", type=float, default=defaults.POINT_JITTER,
                   help="sam-refine: Gaussian noise on the training edge points, as a fraction of the box side "
                        "(match it to the keypoint net's error)")
    p.add_argument("--refine-train-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine training: ground-truth edge points, or the base bundle's keypoint net's points "
                        "on each jittered box (the errors the deployed curriculum sees), both plus --point-jitter")
    p.add_argument("--refine-train-boxes", default="jitter", choices=["jitter", "detector"],
                   help="sam-refine training: the coarse pass on ground-truth boxes with --box-jitter noise, or on "
                        "the base bundle's detector's boxes on each training image under another look (light, "
                        "highlights, blur, JPEG), so the refine head meets the coarse pass's real errors")
    p.add_argument("--refine-val-boxes", default="gt", choices=["gt", "detector"],
                   help="sam-refine validation: on ground-truth boxes, or on the base bundle's detector's")
    p.add_argument("--box-jitter", type=float, default=0.1,
                   help="sam-refine: Gaussian noise on the training boxes' edges, as a fraction of the box side")
    p.add_argument("--refine-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine validation: ground-truth edge points, or those of the base bundle's keypoint "
                        "net (what the deployed curriculum sees; needs a trained keypoint net)")
    p.add_argument("--keypoint-arch", default=None, metavar="ARCH",
                   help="a registered keypoint family: embedding_heatmap (a heatmap head on the SAM embedding) or "
                        "topdown_heatmap (alias hrnet: the top-down net on image crops, HRNet or another timm "
                        "backbone such as efficientnet_lite0); default: the base bundle's")
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
    p.add_argument("--cache-dir", default=str(defaults.DEFAULT_CACHE_DIR), help="embedding cache folder")
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
    p.add_argument("--cache-dir", default=str(defaults.DEFAULT_CACHE_DIR),
                   help="embedding cache folder (--val-metric sam)")


def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser("cp-train", "Fine-tune the curriculum's four models into a bundle.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help=f"a stage to train ({', '.join(defaults.STAGE_NAMES)}), 'all' (the four in order), "
                                "'ensemble' or 'evaluate'")
    for name in (*defaults.STAGE_NAMES, "all"):
        _add_training_flags(sub.add_parser(name, help="train the four stages in order" if name == "all"
                                           else f"train the {name} stage"))
    _add_ensemble_flags(sub.add_parser("ensemble", help="fuse the detectors (or keypoint nets) of trained bundles "
                                       "into one bundle, optionally re-tuning its thresholds on validation"))
    ev = sub.add_parser("evaluate", help="record a bundle's curriculum mDice on an images/ + masks/ folder in "
                        "its metadata")
    ev.add_argument("--bundle", required=True, help="bundle directory to update")
    ev.add_argument("--examples", default="examples", help="folder with images/ and masks/")
    return p


def main(argv: list[str] | None = None) -> int:
    """Also the entry point of every rank under ``torchrun --nproc-per-node N``: ``--batch-size``
    is then per rank (the global batch is N times it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ensemble" and (args.data is None) != (args.split is None):
        parser.error("--data and --split go together")
    if args.command == "ensemble" and args.data and args.stage != "detector":
        parser.error("--data/--split re-tune a detector's threshold; keypoints have none")
    # The one import below the top: the command bodies bring torch, which --help must not wait for.
    from cp_train import commands

    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
