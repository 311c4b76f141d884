"""tools/pack_split.py: the split's images shrunk to --max-side, their masks exact, nothing else."""

from __future__ import annotations

import cv2
import numpy as np

from cp_deploy.files import read_mask
from cp_train.data import load_samples, read_split
from tools.pack_split import pack


def test_pack_writes_only_the_split_shrunk_with_exact_masks(dataset, tmp_path):
    split = tmp_path / "part.txt"
    split.write_text("s00\ns03\n")
    out = tmp_path / "packed"
    total = pack(dataset, split, out, max_side=40, quality=90)
    assert read_split(out / "train.txt") == ["s00", "s03"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["s00.jpg", "s03.jpg"]
    files = [*(out / "images").iterdir(), *(out / "masks").iterdir()]
    assert total == sum(p.stat().st_size for p in files)
    for s in load_samples(dataset, ["s00", "s03"], max_side=40, progress=False):
        img = cv2.imread(str(out / "images" / f"{s.name}.jpg"))
        assert img.shape[:2] == s.mask.shape and max(img.shape[:2]) == 40
        assert np.array_equal(read_mask(out / "masks" / f"{s.name}.png"), s.mask)
