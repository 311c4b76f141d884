"""``cp-bench``: accuracy over a split, speed against the SamPredictor loop, memory against images.

    cp-bench accuracy --data D --split D/splits/test.txt [--bundle B] [--rows all|2,5] [--json F]
    cp-bench speed [--bundle B] [--engine torch|onnxruntime|openvino|trt] [--device cpu|cuda] [--batch-size N]
                   [--images N] [--image-dir DIR] [--reference] [--latency] [--json F]
    cp-bench memory [--sizes 100 10000] [--json F]

Only argparse-level modules are imported here, so ``--help`` and ``--version`` answer without
loading torch; the command bodies live in :mod:`cp_bench.commands`, imported once the flags parse.
"""

from __future__ import annotations

import argparse
import sys

from cp_deploy import cli as common
from cp_deploy.errors import run_command
from cp_train import defaults

ROWS_HELP = ("comma-separated row numbers (1-based) or 'all': 1 points, 2 box, 3 box+points, 4 box+mask, "
             "5 curriculum, 6 curriculum with positive edge labels (all with the detector's boxes), "
             "7 box and 8 curriculum with ground-truth boxes")


def build_parser() -> argparse.ArgumentParser:
    ap = common.new_parser("cp-bench", __doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    bundle_help = "bundle directory (default: the shipped one)"

    acc = sub.add_parser("accuracy", help="mDice / mIoU of a bundle on a split, one row per prompt mode",
                         description="mDice and mIoU for every prompt mode of the paper, on the embeddings of "
                                     "the training cache (one encoder pass per image for all rows).")
    acc.add_argument("--bundle", default=None, help=bundle_help)
    acc.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    acc.add_argument("--split", required=True, help="file of the names to score, one per line")
    acc.add_argument("--cache-dir", default=str(defaults.DEFAULT_CACHE_DIR), help="embedding cache")
    acc.add_argument("--rows", default="all", help=ROWS_HELP)
    acc.add_argument("--shift", action="store_true",
                     help="score the split's images after a seeded domain shift (colour, highlights, blur, JPEG, "
                          "black border and text, aspect ratio; cp_train/shift.py): our stand-in for another hospital")
    acc.add_argument("--json", default=None, help="also write the rows as JSON here")
    acc.set_defaults(run="run_accuracy")

    sp = sub.add_parser("speed", help="throughput and per-stage time, and the SamPredictor loop in the same run",
                        description="Throughput, batch latency, time per stage and peak memory of the "
                                    "pipeline after a warm-up; --reference also times the naive SamPredictor loop "
                                    "on the same weights and images.")
    sp.add_argument("--bundle", default=None, help=bundle_help)
    sp.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "openvino", "trt"],
                    help="engine to time")
    sp.add_argument("--graphs", default=None, 
                    help="exported graphs for onnxruntime/openvino/trt (default BUNDLE/onnx|trt)")
    sp.add_argument("--device", default="auto", type=common.device, help=common.DEVICE_HELP)
    sp.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    sp.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="torch engine precision")
    sp.add_argument("--compile", action="store_true", help="torch engine: torch.compile the encoder")
    sp.add_argument("--images", type=int, default=15, help="images to time (cycled from --image-dir)")
    sp.add_argument("--image-dir", default="examples/images", help="folder of images ('' for synthetic ones)")
    sp.add_argument("--reference", action="store_true", help="also time the SamPredictor reference, same images")
    sp.add_argument("--latency", action="store_true",
                    help="latency mode: batch 1, one image per call; p50/p95/mean ms per image (device synchronised)")
    sp.add_argument("--threads", type=int, default=0,
                    help="CPU threads of torch / ONNX Runtime / OpenVINO (0: default)")
    sp.add_argument("--end-to-end", action="store_true",
                    help="time cp-deploy batch's executor from image files to written masks (models' load "
                    "included), and with --reference the SamPredictor loop reading and writing the same files")
    sp.add_argument("--model-workers", default="auto", metavar="auto|N",
                    help="--end-to-end: cp-deploy batch's --model-workers")
    sp.add_argument("--json", default=None, help="write the numbers here too")
    sp.set_defaults(run="run_speed")

    mem = sub.add_parser("memory", help="peak memory of cp-deploy batch against the number of images",
                         description="Peak resident memory of cp-deploy batch against the number of images, "
                                     "each size in a fresh process on the seeded tiny bundle.")
    mem.add_argument("--sizes", type=int, nargs="+", default=[100, 10000], help="image counts, one process each")
    mem.add_argument("--json", default=None, help="write the results here")
    mem.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    mem.set_defaults(run="run_memory")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    # The one import below the top: the command bodies bring torch, which --help must not wait for.
    from cp_bench import commands

    return run_command("cp-bench", lambda: getattr(commands, a.run)(a))


if __name__ == "__main__":
    sys.exit(main())
