"""``cp-deploy batch | eval | report``: thin argument parsing over the same functions a Python user calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cp_deploy.bundle import PROMPT_MODES
from cp_deploy.errors import InputError, run_command
from cp_deploy.executors import PipelineFactory, check_device
from cp_deploy.executors.local import run_folder
from cp_deploy.executors.ray import run_folder_ray
from cp_deploy.files import MAX_PIXELS
from cp_deploy.formats import ReadOptions
from cp_deploy.metrics import evaluate_dirs
from cp_deploy.pipeline import PipelineOptions
from cp_deploy.report import write_report


def _check_counts(args: argparse.Namespace) -> None:
    """Numbers argparse accepts but a run cannot use; refused before anything loads."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--threads", args.threads, 0), ("--num-workers", args.num_workers, 1),
                               ("--gpus-per-worker", args.gpus_per_worker, 0)):
        if value < least:
            raise InputError(f"{flag} {value}: must be at least {least}; pass {flag} N with N >= {least}")


def _batch(args: argparse.Namespace) -> int:
    _check_counts(args)
    # Ray actors may have GPUs the driver lacks: there only the spelling of --device is checked.
    check_device(args.device, args.engine, count_gpus=args.executor == "local")
    options = PipelineOptions(
        prompts=args.prompts, edge_label=args.edge_label, mode=args.mode,
        score_threshold=args.score_threshold, max_instances=args.max_instances, min_instances=args.min_instances,
    )
    device = "cuda" if args.executor == "ray" and args.gpus_per_worker and args.device == "cpu" else args.device
    # Absolute paths: Ray workers do not share the driver's working directory.
    bundle, graphs = (os.path.abspath(p) if p else None for p in (args.bundle, args.graphs))
    factory = PipelineFactory(bundle, args.engine, device, options, args.threads, graphs, args.precision,
                              args.compile)
    common = {"batch_size": args.batch_size, "overlays": args.overlays, "resume": args.resume,
              "overwrite": args.overwrite, "progress": not args.no_progress,
              "read_options": ReadOptions(slice_axis=args.slice_axis, include_uids=args.include_uids,
                                          max_pixels=args.max_pixels)}
    # The executors check and lock --output before the models load from ``factory``.
    if args.executor == "ray":
        summary = run_folder_ray(factory, args.input, args.output, num_workers=args.num_workers,
                                 gpus_per_worker=args.gpus_per_worker, cpus_per_worker=max(1, args.threads),
                                 address=args.ray_address, **common)
    else:
        summary = run_folder(factory, args.input, args.output, workers=args.workers, **common)
    print(f"cp-deploy: {summary.line()}")
    return 1 if summary.failed else 0


def _eval(args: argparse.Namespace) -> int:
    csv_path = args.csv or (Path(args.pred) / "eval.csv")
    s = evaluate_dirs(args.pred, args.gt, csv_path)
    if s["missing"]:
        print(f"warning: {len(s['missing'])} ground-truth images have no prediction and count as empty: "
              f"{', '.join(s['missing'][:5])}{' ...' if len(s['missing']) > 5 else ''}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: s[k] for k in ("n", "mDice", "mIoU")}))
    else:
        print(f"images: {s['n']}  mDice: {s['mDice']:.4f}  mIoU: {s['mIoU']:.4f}  (per-image CSV: {csv_path})")
    return 0


def _report(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir, gt_dir=args.gt, output=args.output, max_gallery=args.max_images)
    print(f"cp-deploy: report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cp-deploy", description="Curriculum-prompted SAM segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("batch", help="segment every image in a folder",
                       description="Segment every png/jpg/jpeg/bmp/tif(f), DICOM (.dcm, .dicom or any file "
                                   "with the DICM preamble) and NIfTI (.nii, .nii.gz) file under --input, "
                                   "recursively. DICOM inputs also get a DICOM-SEG, NIfTI inputs a mask NIfTI.")
    b.add_argument("--input", required=True, help="folder of images (searched recursively)")
    b.add_argument("--output", required=True, help="folder for masks/, overlays/ and results.jsonl")
    b.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped with the package)")
    b.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "trt"], help="inference engine")
    b.add_argument("--graphs", default=None,
                   help="folder of exported graphs for --engine onnxruntime|trt (default: BUNDLE/onnx or BUNDLE/trt)")
    b.add_argument("--device", default="cpu", help="device: cpu, cuda or cuda:N (trt always runs on cuda)")
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
    b.add_argument("--resume", action="store_true",
                   help="continue the run in --output: skip images already done (its settings must be the same)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace cp-deploy's outputs in a non-empty --output (masks/, overlays/, results, run.json, "
                        "eval.csv, report.html); other files there are kept")
    b.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    b.add_argument("--threads", type=int, default=0, help="CPU threads of torch or ONNX Runtime (0: their default)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--slice-axis", type=int, default=None, choices=[0, 1, 2],
                   help="NIfTI volumes: voxel axis to slice along (default: the axis of largest voxel spacing)")
    b.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="refuse an image, page, frame or slice over this many pixels (width x height, read from "
                        "the header before decoding; 0: no limit; default: %(default)s)")
    b.add_argument("--include-uids", action="store_true",
                   help="DICOM: write study/series/SOP instance UIDs to results.jsonl (names, IDs and dates never are)")
    b.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process; ray: a Ray cluster (needs the 'ray' extra)")
    b.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. HEAD:6379 (default: RAY_ADDRESS, else a local one)")
    b.add_argument("--num-workers", type=int, default=1, help="Ray actors, each with its own copy of the models")
    b.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray actor (with --device cpu, >0 switches the actors to cuda)")
    b.set_defaults(func=_batch)

    e = sub.add_parser("eval", help="mDice and mIoU of predicted masks against ground truth",
                       description="Dice and IoU per image, then their means (the paper's metrics).")
    e.add_argument("--pred", required=True, help="run folder (uses its masks/) or a folder of mask PNGs")
    e.add_argument("--gt", required=True, help="folder of ground-truth masks, matched by relative path and stem")
    e.add_argument("--csv", default=None, help="per-image CSV path (default: PRED/eval.csv)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=_eval)

    r = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="One report.html: counts, failures, throughput, per-stage timings and a "
                                   "gallery of overlays (worst Dice first with --gt).")
    r.add_argument("run_dir", help="output folder of cp-deploy batch")
    r.add_argument("--gt", default=None, help="folder of ground-truth masks: adds Dice per image, worst first")
    r.add_argument("--output", default=None, help="report path (default: RUN_DIR/report.html)")
    r.add_argument("--max-images", type=int, default=200, help="at most this many images in the gallery")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command("cp-deploy", lambda: args.func(args))  # a full disk mid-run: exit 1; usage: 2
    except KeyboardInterrupt:
        print("cp-deploy: interrupted; finished images are saved, rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
