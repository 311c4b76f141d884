"""Pack a training split, shrunk, into a small folder (to carry to a machine that trains there).

    python -m tools.pack_split --data D --split D/splits/train.txt --out .gpudata/kvasir-train \\
        --max-side 384 [--quality 92] [--weightless-base DIR]

Images are re-encoded as JPEG (``--quality``) at ``--max-side`` (longest side, area
interpolation), masks as PNG (nearest), with the split as ``train.txt``. Only the split's names
are copied, so the test images never leave this machine. ``cp-train`` shrinks each image to
``--detector-size`` anyway, so packing at that size changes nothing the detector sees.

``--weightless-base DIR`` also writes the shipped bundle's ``bundle.json`` without its weight
files (``cp_deploy.bundle.weightless_copy``), a ``--base`` for ``cp-train detector --val-metric
boxes``, which reads none of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cp_deploy.bundle import weightless_copy
from cp_deploy.files import atomic_write_bytes, encode_image
from cp_train.data import load_samples, read_split


def pack(data: Path, split: Path, out: Path, max_side: int, quality: int = 92) -> int:
    """Write OUT/images, OUT/masks and OUT/train.txt; returns the bytes of images and masks."""
    names = read_split(split)
    total = 0
    for s in load_samples(data, names, max_side=max_side):  # the trainer's own decode and shrink
        jpg = encode_image(s.image, ".jpg", quality)
        png = encode_image(s.mask.astype(np.uint8) * 255, ".png")
        atomic_write_bytes(out / "images" / f"{s.name}.jpg", jpg)
        atomic_write_bytes(out / "masks" / f"{s.name}.png", png)
        total += len(jpg) + len(png)
    atomic_write_bytes(out / "train.txt", ("\n".join(names) + "\n").encode())
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    ap.add_argument("--split", required=True, help="file of the names to pack (the training split)")
    ap.add_argument("--out", required=True, help="folder to write (keep it git-ignored)")
    ap.add_argument("--max-side", type=int, default=320, help="longest side of the packed images")
    ap.add_argument("--quality", type=int, default=92, help="JPEG quality (lower: a smaller folder)")
    ap.add_argument("--weightless-base", default=None, metavar="DIR",
                    help="also write the shipped bundle.json without weight files to DIR (a --base for cp-train)")
    a = ap.parse_args(argv)
    if a.weightless_base:
        print(f"wrote {weightless_copy(Path(a.weightless_base)).root / 'bundle.json'}")
    n = pack(Path(a.data), Path(a.split), Path(a.out), a.max_side, a.quality)
    print(f"packed {len(read_split(a.split))} images into {a.out}: {n / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
