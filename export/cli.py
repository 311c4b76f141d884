"""``cp-export``: ONNX and TensorRT export (issue 4; not built yet)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cp-export", description="Export a bundle to ONNX or TensorRT.")
    parser.add_argument("target", choices=["onnx", "trt"], help="what to export to")
    parser.parse_known_args(argv)
    print("cp-export: export is not implemented in this release; use cp-deploy --engine torch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
