"""Shared fixtures: a seeded tiny bundle (a few MB) and small image folders."""

from __future__ import annotations

import atexit
import builtins
import os
import shutil
import tempfile
from pathlib import Path

# Set before cp_deploy is imported: never reach the Hugging Face hub (read by huggingface_hub when
# it is first imported), and keep the suite's caches (OpenVINO's compiled graphs) out of the home.
os.environ["HF_HUB_OFFLINE"] = "1"
# The folder is removed when the suite ends: CI's machine is reused, and each run leaves ~400 MB.
if "CP_CACHE_DIR" not in os.environ:
    os.environ["CP_CACHE_DIR"] = tempfile.mkdtemp(prefix="cp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CP_CACHE_DIR"], ignore_errors=True)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cp_deploy.models.build import init_bundle  # noqa: E402
from cp_deploy.models.registry import keypoint_family  # noqa: E402

# The top-down keypoint net at its smallest: HRNet-W18-small on 64-pixel crops.
TOPDOWN_TINY = keypoint_family("topdown_heatmap").default_config(backbone="hrnet_w18_small", crop_size=64,
                                                                 head_channels=32)

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


def batch_on_torch_and_onnxruntime(bundle, graphs: Path, tmp_path: Path, n: int) -> tuple[Path, Path]:
    """``cp-deploy batch`` on ``n`` images with the torch engine and with onnxruntime on ``graphs``;
    checks that their masks agree and returns both output folders."""
    from cp_deploy.cli import main as deploy_main
    from cp_deploy.files import read_mask

    make_images(tmp_path / "in", n)
    common = ["batch", "--input", str(tmp_path / "in"), "--bundle", str(bundle.root), "--no-progress"]
    assert deploy_main([*common, "--output", str(tmp_path / "t")]) == 0
    assert deploy_main([*common, "--output", str(tmp_path / "o"), "--engine", "onnxruntime",
                        "--graphs", str(graphs)]) == 0
    masks = sorted((tmp_path / "t" / "masks").glob("*.png"))
    assert len(masks) == n
    for p in masks:
        assert (read_mask(p) == read_mask(tmp_path / "o" / "masks" / p.name)).mean() > 0.999
    return tmp_path / "t", tmp_path / "o"


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "in"
    make_images(d, 5)
    return d


# A tiny Grounding DINO (Swin of 4 one-block stages, BERT of one layer, d_model 32, 10 queries) on
# 128-pixel inputs: the smallest size whose coarsest feature level (stride 64) keeps 2x2 cells for
# its GroupNorm at batch 1.
GDINO_SIZE = 128
TINY_GDINO = {
    "backbone_config": {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                        "window_size": 4, "out_indices": [2, 3, 4], "image_size": GDINO_SIZE},
    "text_config": {"model_type": "bert", "vocab_size": 1040, "hidden_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32},
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 10, "max_text_len": 16,
    "encoder_n_points": 2, "decoder_n_points": 2,
}


def write_tiny_vocab(path: Path) -> Path:
    from cp_deploy.models.families.grounding_dino import write_synthetic_vocab

    return write_synthetic_vocab(path, TINY_GDINO["text_config"]["vocab_size"])


@pytest.fixture(scope="session")
def gdino_bundle(tmp_path_factory):
    """The paper's two models, tiny and seeded random: the tiny SAM with Grounding DINO as detector
    and the top-down net on HRNet-W18-small as keypoint net; threshold 0 and 3 instances, so every image yields 3."""
    pytest.importorskip("transformers", reason="the gdino extra is not installed: pip install '.[gdino]'")
    return init_bundle(tmp_path_factory.mktemp("gdino"), "tiny", seed=0, gdino=TINY_GDINO, detector_size=GDINO_SIZE,
                       keypoints=("topdown_heatmap", TOPDOWN_TINY),
                       prompt={"text": "polyp", "score_threshold": 0.0, "max_instances": 3})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Twelve small images, one bright ellipse (the lesion) each, with masks and train.txt."""
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


def without_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``import name`` (and its submodules) fail, as where its extra is not installed."""
    real_import = builtins.__import__

    def blocked(module: str, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named '{module}'")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
