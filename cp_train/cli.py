"""``cp-train``: fine-tune the bundle's models."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cp-train", description="Fine-tune the curriculum's four models.")
    stages = ["detector", "keypoints", "sam-box", "sam-refine", "all"]
    parser.add_argument("stage", choices=stages, help="what to train")
    parser.parse_known_args(argv)
    print("cp-train: training is not implemented in this release", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
