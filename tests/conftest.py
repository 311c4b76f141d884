"""Shared fixtures: a seeded tiny bundle (a few MB) and small image folders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.models.build import init_bundle

# The random tiny detector scores around 0.1; a low threshold makes it yield instances.
TINY_PROMPT = {"score_threshold": 0.05, "max_instances": 3}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return init_bundle(tmp_path_factory.mktemp("bundle"), "tiny", seed=0, prompt=TINY_PROMPT)


def make_images(folder: Path, n: int, seed: int = 0, sizes=((96, 128), (131, 77), (64, 64))) -> list[Path]:
    """Smooth random RGB images (blobs on a background) of assorted odd sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = np.full((h, w, 3), rng.integers(30, 90), np.uint8)
        cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), rng.integers(8, 20)
        cv2.circle(img, (int(cx), int(cy)), int(r), tuple(int(v) for v in rng.integers(120, 255, 3)), -1)
        img = cv2.GaussianBlur(img, (5, 5), 0)
        p = folder / f"img_{i:03d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "in"
    make_images(d, 5)
    return d
