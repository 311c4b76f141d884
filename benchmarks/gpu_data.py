"""Pack a training split, shrunk, into a folder small enough to carry to the lent GPU machine.

    python -m benchmarks.gpu_data --data ../shared/data/kvasir-seg --split splits/train.txt \\
        --out .gpudata/kvasir-train --max-side 320

Images are re-encoded as JPEG (``--quality``, default 92) at ``--max-side`` (longest side, area interpolation),
masks as PNG (nearest), with the split as ``train.txt``. Only the split's names are copied, so the
test images never leave this machine. ``cp-train`` shrinks each image to ``--detector-size``
anyway, so packing at that size changes nothing the detector sees.

``--weightless-base DIR`` also writes the shipped bundle's ``bundle.json`` without its weight files
(SAM heads, detector, keypoint net: 42 MB), as a ``--base`` for ``cp-train detector --val-metric
boxes``, which reads none of them. Moving those files out of the working tree for the call then
leaves room for the data (the third lease's recipe, docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from cp_train.data import load_samples, read_split


def pack(data: Path, split: Path, out: Path, max_side: int, quality: int = 92) -> int:
    """Write OUT/images, OUT/masks and OUT/train.txt; returns the bytes written."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = read_split(split)
    total = 0
    for s in load_samples(data, names, max_side=max_side):  # the trainer's own decode and shrink
        ok1, jpg = cv2.imencode(".jpg", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        ok2, png = cv2.imencode(".png", s.mask.astype(np.uint8) * 255)
        if not (ok1 and ok2):
            raise RuntimeError(f"could not encode {s.name}")
        (out / "images" / f"{s.name}.jpg").write_bytes(jpg.tobytes())
        (out / "masks" / f"{s.name}.png").write_bytes(png.tobytes())
        total += len(jpg) + len(png)
    (out / "train.txt").write_text("\n".join(names) + "\n")
    return total


def weightless_base(out: Path, bundle: Path | None = None) -> Path:
    """Write OUT/bundle.json: ``bundle``'s (default: the shipped one) with no weight file, loadable
    by :func:`cp_deploy.bundle.load_bundle`; returns its path."""
    from cp_deploy.bundle import BUNDLE_FILE, default_bundle_path

    spec = json.loads(((bundle or default_bundle_path()) / BUNDLE_FILE).read_text())
    spec["heads"] = {}
    for key in ("detector", "keypoints"):
        spec[key].pop("file", None)
        spec[key].pop("sha256", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / BUNDLE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return out / BUNDLE_FILE


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    ap.add_argument("--split", required=True, help="file of the names to pack (the training split)")
    ap.add_argument("--out", required=True, help="folder to write (keep it git-ignored)")
    ap.add_argument("--max-side", type=int, default=320, help="longest side of the packed images")
    ap.add_argument("--quality", type=int, default=92,
                    help="JPEG quality (lower it to fit the 64 MiB a call carries, repo and wheels included)")
    ap.add_argument("--weightless-base", default=None, metavar="DIR",
                    help="also write the shipped bundle.json without weight files to DIR "
                         "(a --base for cp-train on a GPU)")
    a = ap.parse_args(argv)
    if a.weightless_base:
        print(f"wrote {weightless_base(Path(a.weightless_base))}")
    n = pack(Path(a.data), Path(a.split), Path(a.out), a.max_side, a.quality)
    print(f"packed {len(read_split(a.split))} images into {a.out}: {n / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
