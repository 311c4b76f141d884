"""``cp-export onnx | trt``: export a bundle, then check the result against torch (always).

Only argparse-level modules are imported here, so ``--help`` and ``--version`` answer without
loading torch; the command bodies live in :mod:`export.commands`, imported once the flags parse.
"""

from __future__ import annotations

import argparse
import sys

from cp_deploy import cli as common
from cp_deploy.errors import run_command

# cp_deploy.engines.manifest.GRAPHS, spelled here: that module imports torch (a test keeps them equal).
GRAPH_NAMES = ("encoder", "detector", "keypoints", "box", "refine")


def build_parser() -> argparse.ArgumentParser:
    parser = common.new_parser("cp-export", "Export a bundle to ONNX or TensorRT engines; every export is checked "
                            "against the torch engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    def parity_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", default=None, help="folder of real images for the parity check "
                       "(default: synthetic images)")
        p.add_argument("--rel-tol", type=float, default=None,
                       help="max abs logit difference, relative to max(1, max|torch output|) "
                       "(default 1e-3 for fp32 graphs, 2e-2 for fp16; int8 graphs: none, their masks are judged)")
        p.add_argument("--pixel-agreement", type=float, default=None,
                       help="least fraction of equal final-mask pixels per image (default 0.999; fp16 0.995; "
                       "with int8 graphs 0.98)")
        p.add_argument("--min-dice", type=float, default=None,
                       help="least Dice between torch and exported final masks per image (default 0.99; fp16 and "
                       "with int8 graphs 0.98)")
        p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")

    o = sub.add_parser("onnx", help="write the five ONNX graphs and manifest.json",
                       description="Export encoder, detector, keypoint net and both decoders to ONNX.")
    o.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped with the package)")
    o.add_argument("--out", default=None, help="output folder (default: BUNDLE/onnx)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    o.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16"],
                   help="fp16: half-precision graphs with LayerNorm and softmax in fp32 (for GPUs); int8: fp32 "
                   "graphs, then each quantised (static, calibrated on --calib-images) and kept only where it "
                   "passes the gate against fp32 (for CPUs: ONNX Runtime and OpenVINO); bf16: fp32 graphs, each "
                   "run by OpenVINO in bf16 where it passes the same gate (for CPUs with AVX512-BF16 or AMX; "
                   "--engine openvino only)")
    o.add_argument("--external-data", default="auto", choices=["auto", "yes", "no"],
                   help="weights in side files: auto = for graphs over 1 GiB (ViT-H's encoder)")
    q = o.add_argument_group("int8 and bf16 (--precision int8|bf16; the --calib flags: int8 and --nncf-int8)")
    q.add_argument("--nncf-int8", nargs="+", default=[], choices=GRAPH_NAMES, metavar="GRAPH",
                   help="with --precision bf16: then quantise these graphs (of encoder, detector, keypoints, box, "
                   "refine) to int8 with NNCF on OpenVINO, each kept where it passes the same gate, and the "
                   "folder as a whole once more (needs the nncf extra and --calib-images)")
    q.add_argument("--calib-images", default=None, metavar="DIR",
                   help="folder of TRAINING images to calibrate on (required for int8 and --nncf-int8; never "
                   "test images)")
    q.add_argument("--calib-count", type=int, default=64, metavar="N",
                   help="calibrate on at most N of them, spread over the folder (default 64)")
    q.add_argument("--val-data", default=None, metavar="DIR",
                   help="validation folder with images/ and masks/: the gate also requires validation mDice "
                   "within --gate-max-mdice-drop of fp32 (with --val-split)")
    q.add_argument("--val-split", default=None, metavar="FILE", help="names of the validation images, one per line")
    q.add_argument("--gate-min-dice", "--int8-min-dice", dest="int8_min_dice", type=float, default=0.98,
                   help="least per-image Dice of a graph's int8 or bf16 final masks against fp32's (default 0.98)")
    q.add_argument("--gate-max-mdice-drop", "--int8-max-mdice-drop", dest="int8_max_mdice_drop", type=float,
                   default=0.005, help="most validation mDice an int8 or bf16 graph may lose against fp32 "
                   "(default 0.005)")
    parity_flags(o)
    o.set_defaults(func="onnx")

    t = sub.add_parser("trt", help="build TensorRT engines from exported ONNX graphs (on the target GPU)",
                       description="Build serialized TensorRT engines with optimisation profiles.")
    t.add_argument("--onnx", required=True, help="folder written by cp-export onnx")
    t.add_argument("--out", required=True, help="output folder for *.engine and manifest.json")
    t.add_argument("--bundle", default=None, help="bundle for the parity check (default: the one the graphs name)")
    t.add_argument("--fp16", action="store_true",
                   help="fp16 engines (from fp16 graphs, exported into OUT/onnx-fp16 when --onnx holds fp32 ones); "
                   "LayerNorm and softmax stay fp32")
    t.add_argument("--max-batch", type=int, default=8, help="largest image batch the engines accept (default 8)")
    t.add_argument("--max-instances", type=int, default=32, help="largest instance count per decoder call")
    t.add_argument("--max-points", type=int, default=16, help="largest number of prompt points per instance")
    t.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB (default 4)")
    parity_flags(t)
    t.set_defaults(func="trt")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The one import below the top: the command bodies bring torch, which --help must not wait for.
    from export import commands

    return run_command("cp-export", lambda: getattr(commands, args.func)(args))  # ParityError: exit 1; usage: 2


if __name__ == "__main__":
    sys.exit(main())
