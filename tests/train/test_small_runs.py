"""Small training runs stay small and say what they do: --max-images caps validation too, the plan
and the embedding cache are printed first, the log names its metric and the lr used, epochs and
cp-export's parity checks show progress, and the bundle written describes this run instead of the
base's."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from cp_deploy import __version__
from cp_deploy.bundle import load_bundle, update_spec
from cp_deploy.engines.torch import TorchEngine
from cp_train.cli import main as train_main
from cp_train.data import Dataset, carve_validation, read_split
from cp_train.trainers.loop import LoopConfig, fit, shuffled_epoch
from export.parity import check_parity, synthetic_images


def test_max_images_caps_validation_too(dataset):
    full = Dataset(dataset, dataset / "train.txt", val_fraction=0.75)
    train, val = full.names()
    assert (len(train), len(val)) == (3, 9)
    small = Dataset(dataset, dataset / "train.txt", val_fraction=0.75, max_images=2)
    s_train, s_val = small.names()
    assert s_train == train[:2] and s_val == val[:5]  # max(2 // 4, 5)
    assert len(Dataset(dataset, dataset / "train.txt", val_fraction=0.75, max_images=24).names()[1]) == 6
    assert small.carved_sizes() == (3, 9)
    assert set(s_val) <= set(carve_validation(read_split(dataset / "train.txt"), 0.75)[1])


@pytest.fixture
def stale_base(tiny_bundle, tmp_path):
    """The tiny bundle with a description and an examples score, as the default bundle has."""
    base = tmp_path / "base"
    shutil.copytree(tiny_bundle.root, base)
    update_spec(base, "metadata", {"description": "the base's own networks", "examples": {"mDice": 0.94}})
    return base


def test_small_sam_box_run_prints_its_plan_logs_lr_and_metric_and_describes_itself(dataset, stale_base, tmp_path,
                                                                                 capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["sam-box", "--data", str(dataset), "--split", str(dataset / "train.txt"), "--out", str(out),
            "--base", str(stale_base), "--val-fraction", "0.75", "--max-images", "2", "--epochs", "1",
            "--cache-dir", str(cache), "--no-progress"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    plan = next(line for line in printed.splitlines() if "plan:" in line)
    assert "[sam-box] plan: 2 of 3 training and 5 of 9 validation images (--max-images 2 caps both), 1 epoch(s)" in plan
    assert str(cache) in plan and "new: 0 of 7 images cached, 7 to encode" in plan
    assert printed.index("plan:") < printed.index("epoch 1/1")
    assert re.search(r"epoch 1/1 lr 0\.0001 loss [0-9.]+, val mDice \(gt boxes\) [0-9.]+", printed)

    (rec,) = [json.loads(line) for line in (tmp_path / "out-work" / "sam-box" / "log.jsonl").read_text().splitlines()]
    assert rec["lr"] == pytest.approx(1e-4) and rec["metric"] == "val mDice (gt boxes)" and "mDice" in rec

    meta = load_bundle(out).metadata
    assert "examples" not in meta
    assert "the base's own" not in meta["description"]
    assert "sam-box retrained on" in meta["description"] and __version__ in meta["description"]
    run = meta["trained_sam-box"]
    assert (run["train_images"], run["val_images"], run["max_images"], run["epochs"]) == (2, 5, 2, 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", run["date"]) and run["recipe"]["lr"] == pytest.approx(1e-4)

    # The same run again finds every embedding in the cache, and says so.
    assert train_main([*args[:6], str(tmp_path / "again"), *args[7:]]) == 0
    assert "(reused: 7 of 7 images cached, 0 to encode" in capsys.readouterr().out


def test_epochs_and_parity_checks_show_progress_bars(tiny_bundle, tmp_path, capsys):
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)

    def train_epoch(m, opt, epoch):
        return shuffled_epoch(8, 2, 0, epoch, opt, lambda idx, rng: m(x[idx]).pow(2).mean())

    for progress in (True, False):
        fit("lin", model, list(model.parameters()), train_epoch, lambda m: {"mDice": 0.5}, LoopConfig(epochs=2),
            tmp_path / str(progress), progress=progress)
        err = capsys.readouterr().err
        assert ("[lin] epoch 2/2" in err and "/4 " in err) == progress, err  # 4 steps: known after epoch 1

    engine = TorchEngine(tiny_bundle)
    rep = check_parity(tiny_bundle, engine.models, engine, engine, synthetic_images(2), progress=True)
    assert not rep.failures and "parity" in capsys.readouterr().err
