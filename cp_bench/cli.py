"""``cp-bench``: accuracy over a split, speed against the SamPredictor loop, memory against images.

    cp-bench accuracy --data D --split D/splits/test.txt [--bundle B] [--rows all|2,5] [--json F]
    cp-bench speed [--bundle B] [--engine torch|onnxruntime|trt] [--device cpu|cuda] [--batch-size N]
                   [--images N] [--image-dir DIR] [--reference] [--json F]
    cp-bench memory [--sizes 100 10000] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cp_bench import accuracy, memory, speed
from cp_bench.results import write_json
from cp_deploy.bundle import load_bundle
from cp_deploy.errors import run_command
from cp_train.data import DEFAULT_CACHE_DIR, read_split


def _rows(spec: str) -> list[accuracy.Row]:
    try:
        return accuracy.pick_rows(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _accuracy(a: argparse.Namespace) -> int:
    bundle = load_bundle(a.bundle)
    print(f"bundle {bundle.root} ({bundle.detector.arch}), {len(read_split(a.split))} images of {Path(a.split).name}")
    print(accuracy.table_header())
    out = accuracy.accuracy_table(bundle, a.data, a.split, a.cache_dir, a.rows,
                                  on_row=lambda r: print(accuracy.table_line(r), flush=True))
    write_json(a.json, {"bundle": str(bundle.root), "detector": bundle.detector.arch, "split": a.split, "rows": out})
    return 0


def _speed(a: argparse.Namespace) -> int:
    cfg = speed.SpeedConfig(bundle=a.bundle, engine=a.engine, graphs=a.graphs, device=a.device,
                            batch_size=a.batch_size, precision=a.precision, compile=a.compile, images=a.images,
                            image_dir=a.image_dir, reference=a.reference, threads=a.threads)
    result = speed.measure_speed(cfg)
    print(speed.summary(result))
    write_json(a.json, result)
    return 0


def _memory(a: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cp-bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    bundle_help = "bundle directory (default: the shipped one)"

    acc = sub.add_parser("accuracy", help="mDice / mIoU of a bundle on a split, one row per prompt mode",
                         description=accuracy.__doc__)
    acc.add_argument("--bundle", default=None, help=bundle_help)
    acc.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    acc.add_argument("--split", required=True, help="file of the names to score, one per line")
    acc.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="embedding cache")
    acc.add_argument("--rows", default="all", type=_rows,
                     help="comma-separated row numbers (1-based) or 'all': " +
                          "; ".join(f"{i} {r.prompts} ({r.boxes})" for i, r in enumerate(accuracy.ROWS, 1)))
    acc.add_argument("--json", default=None, help="also write the rows as JSON here")
    acc.set_defaults(run=_accuracy)

    sp = sub.add_parser("speed", help="throughput and per-stage time, and the SamPredictor loop in the same run",
                        description=speed.__doc__)
    sp.add_argument("--bundle", default=None, help=bundle_help)
    sp.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "trt"], help="engine to time")
    sp.add_argument("--graphs", default=None, help="exported graphs for onnxruntime/trt (default BUNDLE/onnx|trt)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda")
    sp.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    sp.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="torch engine precision")
    sp.add_argument("--compile", action="store_true", help="torch engine: torch.compile the encoder")
    sp.add_argument("--images", type=int, default=15, help="images to time (cycled from --image-dir)")
    sp.add_argument("--image-dir", default="examples/images", help="folder of images ('' for synthetic ones)")
    sp.add_argument("--reference", action="store_true", help="also time the SamPredictor reference, same images")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads of torch / ONNX Runtime (0: default)")
    sp.add_argument("--json", default=None, help="write the numbers here too")
    sp.set_defaults(run=_speed)

    mem = sub.add_parser("memory", help="peak memory of cp-deploy batch against the number of images",
                         description=memory.__doc__)
    mem.add_argument("--sizes", type=int, nargs="+", default=[100, 10000], help="image counts, one process each")
    mem.add_argument("--json", default=None, help="write the results here")
    mem.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    mem.set_defaults(run=_memory)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("cp-bench", lambda: a.run(a))


if __name__ == "__main__":
    sys.exit(main())
