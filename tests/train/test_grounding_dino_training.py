"""The detector stage with the grounding_dino family: fine-tunes the tiny Grounding DINO on boxes
from the mask components, its set loss falls, and cp-deploy loads the bundle it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cp_deploy.engines.torch import TorchEngine
from cp_deploy.pipeline import CurriculumPipeline
from cp_train.cli import main as train_main
from cp_train.data import Dataset
from cp_train.stages import detector

pytest.importorskip("transformers", reason="the gdino extra is not installed: pip install '.[gdino]'")


def test_grounding_dino_fine_tunes_and_loss_falls(dataset, gdino_bundle, tmp_path):
    import cv2

    out = tmp_path / "bundle"
    data = Dataset(dataset, dataset / "train.txt", val_fraction=0.25, cache_dir=tmp_path / "cache", progress=False)
    bundle = detector.train(gdino_bundle, data, detector.DetectorRecipe(arch="grounding_dino", epochs=4,
                                                                        batch_size=3, lr=1e-3), out)
    log = (Path(f"{out}-work") / "detector" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert bundle.detector.arch == "grounding_dino" and bundle.detector.file is not None
    assert Path(bundle.detector.config["tokenizer"]).is_absolute()
    img = cv2.imread(str(dataset / "images" / "s00.png"))
    (res,) = CurriculumPipeline(bundle, TorchEngine(bundle)).predict([img])
    assert res.mask.shape == img.shape[:2]


def test_grounding_dino_without_weights_says_what_it_needs(dataset, tiny_bundle, tmp_path, capsys):
    args = ["detector", "--detector-arch", "grounding_dino", "--data", str(dataset), "--split",
            str(dataset / "train.txt"), "--out", str(tmp_path / "b"), "--base", str(tiny_bundle.root), "--cache-dir",
            str(tmp_path / "cache"), "--no-progress", "--epochs", "1"]
    assert train_main(args) == 2
    assert "pass --gdino-weights DIR" in capsys.readouterr().err
