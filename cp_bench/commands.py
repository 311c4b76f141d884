"""The bodies of ``cp-bench accuracy | speed | memory``, run after :mod:`cp_bench.cli` has parsed
the flags: this module imports torch and the benchmarks, the parser does not."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from cp_bench import accuracy, memory, speed
from cp_bench.results import write_json
from cp_deploy.bundle import load_bundle
from cp_deploy.devices import resolve_device
from cp_deploy.errors import UsageError
from cp_train.data import read_split

# The flags the CLI module parsed (an Flags); argparse itself stays in the CLI modules.
Flags = Any


def _rows(spec: str) -> list[accuracy.Row]:
    try:
        return accuracy.pick_rows(spec)
    except ValueError as e:
        raise UsageError(f"--rows {e}; pass 'all' or row numbers as listed by cp-bench accuracy --help") from None


def run_accuracy(a: Flags) -> int:
    """``cp-bench accuracy``: one row per prompt mode, printed as each finishes."""
    rows = _rows(a.rows)
    bundle = load_bundle(a.bundle)
    shift = " through the domain shift" if a.shift else ""
    print(f"bundle {bundle.root} ({bundle.detector.arch}), {len(read_split(a.split))} images of {Path(a.split).name}"
          f"{shift}")
    print(accuracy.table_header())
    out = accuracy.accuracy_table(bundle, a.data, a.split, a.cache_dir, rows,
                                  on_row=lambda r: print(accuracy.table_line(r), flush=True), shift=a.shift)
    write_json(a.json, {"bundle": str(bundle.root), "detector": bundle.detector.arch, "split": a.split,
                        "shift": a.shift, "rows": out})
    return 0


def run_speed(a: Flags) -> int:
    """``cp-bench speed``: the pipeline's throughput, and the SamPredictor loop's with --reference."""
    if a.latency and a.batch_size != 1:
        raise UsageError(f"--latency times batch 1 (one image per call); drop --batch-size {a.batch_size}")
    if a.end_to_end and (a.latency or not a.image_dir):
        raise UsageError("--end-to-end times image files to written masks: drop --latency, and give --image-dir "
                         "a folder of images")
    if a.model_workers != "auto" and not a.end_to_end:
        raise UsageError("--model-workers is for --end-to-end (cp-deploy batch's executor)")
    cfg = speed.SpeedConfig(bundle=a.bundle, engine=a.engine, graphs=a.graphs,
                            device=resolve_device(a.device, a.engine),
                            batch_size=a.batch_size, precision=a.precision, compile=a.compile, images=a.images,
                            image_dir=a.image_dir, reference=a.reference, threads=a.threads, latency=a.latency,
                            end_to_end=a.end_to_end, model_workers=a.model_workers)
    result = speed.measure_speed(cfg)
    print(speed.summary(result))
    write_json(a.json, result)
    return 0


def run_memory(a: Flags) -> int:
    """``cp-bench memory``: peak memory of cp-deploy batch, one fresh process per image count."""
    if a.child is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(memory.child(a.child, Path(tmp))))
        return 0
    runs = []
    for n in a.sizes:
        runs.append(memory.run_child(n))
        print(memory.run_line(runs[-1]), flush=True)
    for line in memory.growth_lines(runs):
        print(line)
    write_json(a.json, {"runs": runs}, indent=1)
    return 0
