"""The tiny synthetic training set shared by the training tests."""

from __future__ import annotations

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(12):
        h, w = int(rng.integers(70, 110)), int(rng.integers(70, 110))
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(20, 80, 3)
        mask = np.zeros((h, w), np.uint8)
        c = (int(rng.integers(25, w - 25)), int(rng.integers(25, h - 25)))
        axes = (int(rng.integers(8, 20)), int(rng.integers(8, 20)))
        cv2.ellipse(mask, c, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
        img[mask > 0] = rng.integers(150, 255, 3)
        name = f"s{i:02d}"
        cv2.imwrite(str(root / "images" / f"{name}.png"), img)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
        names.append(name)
    (root / "train.txt").write_text("\n".join(names) + "\n")
    return root
