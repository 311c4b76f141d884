"""The bodies of ``cp-deploy batch | eval | report``, run after :mod:`cp_deploy.cli` has parsed
the flags: this module imports torch and the pipeline, the parser does not."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from cp_deploy.devices import resolve_device
from cp_deploy.errors import InputError
from cp_deploy.executors import PipelineFactory, check_device
from cp_deploy.executors.local import model_workers_value, run_folder
from cp_deploy.executors.ray import run_folder_ray
from cp_deploy.formats import ReadOptions
from cp_deploy.metrics import evaluate_dirs
from cp_deploy.pipeline import PipelineOptions
from cp_deploy.report import write_report

# The flags the CLI module parsed (an Flags); argparse itself stays in the CLI modules.
Flags = Any


def check_counts(args: Flags) -> None:
    """Numbers argparse accepts but a run cannot use; refused before anything loads."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--threads", args.threads, 0), ("--num-workers", args.num_workers, 1),
                               ("--gpus-per-worker", args.gpus_per_worker, 0)):
        if value < least:
            raise InputError(f"{flag} {value}: must be at least {least}; pass {flag} N with N >= {least}")


def batch(args: Flags) -> int:
    """``cp-deploy batch``: segment the inputs into the output folder; exit 1 when any image failed."""
    check_counts(args)
    model_workers = model_workers_value(args.model_workers)
    if args.executor == "ray" and model_workers != "auto":
        raise InputError(f"--model-workers {model_workers}: the local executor's; with --executor ray pass "
                         "--num-workers N (Ray actors, each with its own copy of the models)")
    if args.executor == "ray" and args.device == "auto":  # the actors' GPUs, not the driver's, decide
        device = "cuda" if args.gpus_per_worker else "cpu"
    else:
        device = resolve_device(args.device, args.engine)
    # Ray actors may have GPUs the driver lacks: there only the spelling of --device is checked.
    check_device(device, args.engine, count_gpus=args.executor == "local")
    options = PipelineOptions(
        prompts=args.prompts, edge_label=args.edge_label, mode=args.mode,
        score_threshold=args.score_threshold, max_instances=args.max_instances, min_instances=args.min_instances,
    )
    if args.executor == "ray" and args.gpus_per_worker and device == "cpu":
        device = "cuda"
    # Absolute paths: Ray workers do not share the driver's working directory.
    bundle, graphs = (os.path.abspath(p) if p else None for p in (args.bundle, args.graphs))
    factory = PipelineFactory(bundle, args.engine, device, options, args.threads, graphs, args.precision,
                              args.compile)
    common = {"batch_size": args.batch_size, "overlays": args.overlays, "resume": args.resume,
              "overwrite": args.overwrite, "progress": not args.no_progress, "coco": args.coco,
              "save_logits": args.save_logits,
              "read_options": ReadOptions(slice_axis=args.slice_axis, include_uids=args.include_uids,
                                          max_pixels=args.max_pixels)}
    # The executors check and lock --output before the models load from ``factory``.
    if args.executor == "ray":
        summary = run_folder_ray(factory, args.input, args.output, num_workers=args.num_workers,
                                 gpus_per_worker=args.gpus_per_worker, cpus_per_worker=max(1, args.threads),
                                 address=args.ray_address, **common)
    else:
        summary = run_folder(factory, args.input, args.output, workers=args.workers, model_workers=model_workers,
                             **common)
    print(f"cp-deploy: {summary.line()}")
    return 1 if summary.failed else 0


def evaluate(args: Flags) -> int:
    """``cp-deploy eval``: mDice and mIoU of a run's masks against ground truth."""
    csv_path = args.csv or (Path(args.pred) / "eval.csv")
    s = evaluate_dirs(args.pred, args.gt, csv_path, surface=args.surface, nsd_tolerance=args.nsd_tolerance)
    if s["missing"]:
        print(f"warning: {len(s['missing'])} ground-truth images have no prediction and count as empty: "
              f"{', '.join(s['missing'][:5])}{' ...' if len(s['missing']) > 5 else ''}", file=sys.stderr)
    if args.json:
        keys = ("n", "mDice", "mIoU", *(("mHD95", "hd95_undefined", "mNSD", "nsd_tolerance") if args.surface else ()))
        print(json.dumps({k: s[k] for k in keys}))
    else:
        surface = ""
        if args.surface:
            hd = "undefined" if s["mHD95"] is None else f"{s['mHD95']:.2f} px"
            surface = (f"  mHD95: {hd} ({s['hd95_undefined']} undefined)  "
                       f"mNSD@{args.nsd_tolerance:g}px: {s['mNSD']:.4f}")
        print(f"images: {s['n']}  mDice: {s['mDice']:.4f}  mIoU: {s['mIoU']:.4f}{surface}  (per-image CSV: {csv_path})")
    return 0


def report(args: Flags) -> int:
    """``cp-deploy report``: one self-contained report.html of a run."""
    path = write_report(args.run_dir, gt_dir=args.gt, output=args.output, max_gallery=args.max_images)
    print(f"cp-deploy: report written to {path}")
    return 0
