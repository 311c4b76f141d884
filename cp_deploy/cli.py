"""``cp-deploy batch | eval | report``: thin argument parsing over the same functions a Python user calls.

Only argparse-level modules are imported here, so ``--help`` and ``--version`` answer without
loading torch; the command bodies live in :mod:`cp_deploy.commands`, imported once the flags parse.
The parser helpers below (help formatter, ``--version``, ``--device``) serve every CLI of the package.
"""

from __future__ import annotations

import argparse
import re
import sys

from cp_deploy import __version__
from cp_deploy.constants import MAX_PIXELS, NSD_TOLERANCE, PROMPT_MODES
from cp_deploy.errors import run_command

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
DEVICE_HELP = "auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help, except where there is nothing worth showing
    (no default, a switch that is off) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`HelpFormatter`; its subcommands' parsers are of this
    class too (argparse makes them of the parent's type), so they format help the same way."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def new_parser(prog: str, description: str) -> Parser:
    """A top-level parser with the shared formatter and ``--version`` (the package's version)."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the package version and exit")
    return p


def device(value: str) -> str:
    """``--device``'s spelling, checked while parsing (exit 2); whether the GPU exists is checked later."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; pass {DEVICE_HELP}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("cp-deploy", "Curriculum-prompted SAM segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("batch", help="segment every image in a folder, a file, a glob or a list of paths",
                       description="Segment every png/jpg/jpeg/bmp/tif(f), DICOM (.dcm, .dicom or any file "
                                   "with the DICM preamble), NIfTI (.nii, .nii.gz) and video (.mp4, .avi, .mov) "
                                   "file under --input, recursively, or the files --input names. DICOM inputs also "
                                   "get a DICOM-SEG, NIfTI inputs a mask NIfTI, videos an overlay video.")
    b.add_argument("--input", required=True,
                   help="a folder (searched recursively), one input file, a quoted glob pattern such as "
                        "'data/**/*.png', or a text file listing input paths, one per line (# starts a comment)")
    b.add_argument("--output", required=True, help="folder for masks/, overlays/ and results.jsonl")
    b.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped with the package)")
    b.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "openvino", "trt"],
                   help="inference engine (openvino: CPU only)")
    b.add_argument("--graphs", default=None,
                   help="folder of exported graphs for --engine onnxruntime|openvino|trt (default: BUNDLE/onnx, "
                        "or BUNDLE/trt for trt)")
    b.add_argument("--device", default="auto", type=device,
                   help=f"device: {DEVICE_HELP} (trt always runs on cuda, openvino on cpu)")
    b.add_argument("--batch-size", type=int, default=1, help="images per encoder call")
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="torch engine: autocast precision (LayerNorm and softmax stay fp32); bf16 on recent GPUs")
    b.add_argument("--compile", action="store_true", help="torch engine: torch.compile the image encoder")
    b.add_argument("--prompts", default="curriculum", choices=PROMPT_MODES,
                   help="prompting scheme: the curriculum or one of the paper's ablations")
    b.add_argument("--edge-label", default=None, choices=["negative", "positive"],
                   help="label of the 8 edge points (default: the bundle's, negative as in the paper)")
    b.add_argument("--mode", default=None, choices=["all", "top1"],
                   help="segment all detected instances or only the best one (default: the bundle's)")
    b.add_argument("--score-threshold", type=float, default=None,
                   help="detector score threshold (default: the bundle's)")
    b.add_argument("--max-instances", type=int, default=None, help="at most this many instances per image")
    b.add_argument("--min-instances", type=int, default=None,
                   help="keep at least this many best boxes even under the threshold (default: the bundle's)")
    b.add_argument("--overlays", action="store_true", help="also write overlays/*.jpg with contours, boxes and points")
    b.add_argument("--coco", action="store_true",
                   help="also write each image's instances (masks/NAME.instances.json, RLE) and OUT/instances.json, "
                        "a COCO dataset of them all ('coco' extra)")
    b.add_argument("--save-logits", action="store_true",
                   help="also write the final pass's low-res logits (masks/NAME.logits.npy, Kx1x256x256 float32)")
    b.add_argument("--resume", action="store_true",
                   help="continue the run in --output: skip images already done (its settings must be the same)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace cp-deploy's outputs in a non-empty --output (masks/, overlays/, results, run.json, "
                        "eval.csv, report.html); other files there are kept")
    b.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    b.add_argument("--model-workers", default="auto", metavar="auto|N",
                   help="local executor: N copies of the models (N x their memory), each in its own thread with "
                        "--threads runtime threads (0: cores / N), each taking the next batch when free; auto: the "
                        "CPU arrangement measured fastest for the engine, 1 on a GPU or with --threads set")
    b.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch, ONNX Runtime or OpenVINO per model worker (0: their default, or "
                        "cores / --model-workers)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--slice-axis", type=int, default=None, choices=[0, 1, 2],
                   help="NIfTI volumes: voxel axis to slice along (default: the axis of largest voxel spacing)")
    b.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="refuse an image, page, frame or slice over this many pixels (width x height, read from "
                        "the header before decoding; 0: no limit)")
    b.add_argument("--include-uids", action="store_true",
                   help="DICOM: write study/series/SOP instance UIDs to results.jsonl (names, IDs and dates never are)")
    b.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process; ray: a Ray cluster (needs the 'ray' extra)")
    b.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. HEAD:6379 (default: RAY_ADDRESS, else a local one)")
    b.add_argument("--num-workers", type=int, default=1, help="Ray actors, each with its own copy of the models")
    b.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray actor (over 0 runs the actors on cuda unless --device names a GPU)")
    b.set_defaults(func="batch")

    e = sub.add_parser("eval", help="mDice and mIoU of predicted masks against ground truth",
                       description="Dice and IoU per image, then their means (the paper's metrics).")
    e.add_argument("--pred", required=True, help="run folder (uses its masks/) or a folder of mask PNGs")
    e.add_argument("--gt", required=True, help="folder of ground-truth masks, matched by relative path and stem")
    e.add_argument("--csv", default=None, help="per-image CSV path (default: PRED/eval.csv)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.add_argument("--surface", action="store_true",
                   help="also HD95 and normalised surface Dice per image and their means (MONAI; 'metrics' extra)")
    e.add_argument("--nsd-tolerance", type=float, default=NSD_TOLERANCE,
                   help="--surface: NSD boundary tolerance in pixels (default: %(default)s)")
    e.set_defaults(func="evaluate")

    r = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="One report.html: counts, failures, throughput, per-stage timings and a "
                                   "gallery of overlays (worst Dice first with --gt).")
    r.add_argument("run_dir", help="output folder of cp-deploy batch")
    r.add_argument("--gt", default=None, help="folder of ground-truth masks: adds Dice per image, worst first")
    r.add_argument("--output", default=None, help="report path (default: RUN_DIR/report.html)")
    r.add_argument("--max-images", type=int, default=200, help="at most this many images in the gallery")
    r.set_defaults(func="report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The one import below the top: the command bodies bring torch, which --help must not wait for.
    from cp_deploy import commands

    try:
        # a full disk mid-run: exit 1; usage: 2
        return run_command("cp-deploy", lambda: getattr(commands, args.func)(args))
    except KeyboardInterrupt:
        print("cp-deploy: interrupted; finished images are saved, rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
