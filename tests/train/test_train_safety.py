"""cp-train refuses bad inputs with one line and exit 2: checkpoints that are not plain data
(their code never runs), a missing or empty split, a dataset without images/ or masks/, names
without files, unusable output paths and a missing base bundle, all before any model is built."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cp_train.cli import main as train_main
from cp_train.trainers.loop import LoopConfig, fit


class _Planted:
    """Unpickling this calls ``open(marker, "w")``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _args(data, split, out, base, *extra):
    return ["--data", str(data), "--split", str(split), "--out", str(out), "--base", str(base),
            "--cache-dir", str(Path(out).parent / "cache"), "--val-fraction", "0.25", "--no-progress", *extra]


def _one_line_error(capsys, argv: list[str]) -> str:
    """Runs cp-train, which must exit 2 with exactly one ``cp-train: error:`` line on stderr."""
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cp-train: error: "), err
    return err[0]


@pytest.fixture
def no_models(tmp_path):
    """Fails the test if cp-train computed an embedding (so built the SAM models) before refusing."""
    yield
    assert not (tmp_path / "cache").exists(), "an embedding was computed before the inputs were checked"


def _fit_linear(work: Path, epochs: int, resume: bool, stop_after: int | None = None) -> dict:
    """A tiny model (BatchNorm included) through the real loop with an EMA; its batches and
    scores depend on the epoch alone, as the real trainers' batches do, so a run stopped after
    ``stop_after`` epochs and resumed must end exactly where an uninterrupted one does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    seen = []

    def train_epoch(m, opt, epoch):
        if epoch == stop_after:
            raise KeyboardInterrupt  # the run is killed here; last.pt holds the epochs before
        seen.append(epoch)
        rng = np.random.default_rng(epoch)
        for _ in range(3):
            x = torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))
            loss = (m(x) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    scores = [0.1, 0.3, 0.2, 0.4]
    return fit("lin", model, list(model.parameters()), train_epoch, lambda m: {"mDice": scores[seen[-1]]},
               LoopConfig(epochs=epochs, lr=0.05, ema=0.5, resume=resume), work)


def test_checkpoints_are_plain_data_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight = _fit_linear(tmp_path / "a", 4, resume=False)
    with pytest.raises(KeyboardInterrupt):
        _fit_linear(tmp_path / "b", 4, resume=False, stop_after=2)
    resumed = _fit_linear(tmp_path / "b", 4, resume=True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    for name in ("last.pt", "best.pt"):  # what --resume reads loads without unpickling any object
        a = torch.load(tmp_path / "a" / "lin" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / "lin" / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    last = torch.load(tmp_path / "b" / "lin" / "last.pt", weights_only=True)
    assert "ema" in last and last["optimizer"]["state"]


def test_resume_refuses_a_planted_last_checkpoint_and_runs_none_of_it(dataset, tiny_bundle, tmp_path, capsys):
    out, marker = tmp_path / "bundle", tmp_path / "ran"
    stage_dir = Path(f"{out}-work") / "sam-box"
    stage_dir.mkdir(parents=True)
    torch.save({"model": _Planted(marker), "epoch": 0}, stage_dir / "last.pt")
    line = _one_line_error(capsys, ["sam-box", *_args(dataset, dataset / "train.txt", out, tiny_bundle.root,
                                                      "--epochs", "2", "--max-images", "2", "--resume")])
    assert not marker.exists()
    assert str(stage_dir / "last.pt") in line and "without --resume" in line and str(stage_dir) in line


def test_resume_refuses_a_planted_best_checkpoint(tmp_path):
    _fit_linear(tmp_path, 2, resume=False)
    marker = tmp_path / "ran"
    torch.save({"model": _Planted(marker), "epoch": 0}, tmp_path / "lin" / "best.pt")
    with pytest.raises(RuntimeError, match="best.pt: not a checkpoint of plain tensors") as raised:
        _fit_linear(tmp_path, 2, resume=True)  # nothing left to train: it goes straight to best.pt
    assert type(raised.value).__name__ == "CheckpointError"  # which cp-train's main turns into one line
    assert not marker.exists()


def test_resume_says_so_for_a_truncated_or_foreign_checkpoint(dataset, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bundle"
    stage_dir = Path(f"{out}-work") / "sam-box"
    stage_dir.mkdir(parents=True)
    args = _args(dataset, dataset / "train.txt", out, tiny_bundle.root, "--epochs", "1", "--max-images", "2",
                 "--resume")
    torch.save({"model": {"w": torch.zeros(100)}}, stage_dir / "last.pt")
    (stage_dir / "last.pt").write_bytes((stage_dir / "last.pt").read_bytes()[:200])  # killed mid-write
    assert "last.pt: unreadable" in _one_line_error(capsys, ["sam-box", *args])
    torch.save({"weights": torch.zeros(2)}, stage_dir / "last.pt")  # plain data, but not cp-train's
    assert "last.pt: not a cp-train checkpoint" in _one_line_error(capsys, ["sam-box", *args])


def test_a_missing_or_empty_split_is_one_line(dataset, tiny_bundle, tmp_path, capsys, no_models):
    out = tmp_path / "bundle"
    missing = tmp_path / "nope.txt"
    line = _one_line_error(capsys, ["sam-box", *_args(dataset, missing, out, tiny_bundle.root)])
    assert f"{missing}: split file not found" in line and "--split" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    assert f"{empty}: the split names no image" in _one_line_error(
        capsys, ["sam-box", *_args(dataset, empty, out, tiny_bundle.root)])
    one = tmp_path / "one.txt"
    one.write_text("s00\n")
    assert "all go to validation" in _one_line_error(capsys, ["sam-box", *_args(dataset, one, out, tiny_bundle.root)])


@pytest.mark.parametrize("drop", ["images", "masks"])
def test_a_dataset_without_images_or_masks_is_one_line(dataset, tiny_bundle, tmp_path, capsys, no_models, drop):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.rmtree(data / drop)
    line = _one_line_error(capsys, ["detector", *_args(data, data / "train.txt", tmp_path / "b", tiny_bundle.root)])
    assert f"{data / drop}: no such folder" in line and "images/ and masks/" in line


def test_split_names_without_files_are_one_line_before_any_model(dataset, tiny_bundle, tmp_path, capsys,
                                                                  no_models):
    split = tmp_path / "split.txt"
    names = [f"s{i:02d}" for i in range(12)]
    split.write_text("\n".join([*names, "ghost1", "ghost2"]) + "\n")
    out = tmp_path / "bundle"
    line = _one_line_error(capsys, ["sam-box", *_args(dataset, split, out, tiny_bundle.root)])
    assert f"{split}: 2 of its 14 names have no file in {dataset / 'images'} (ghost1, ghost2)" in line
    assert not (tmp_path / "cache").exists()  # no embedding was computed


def test_a_mask_of_another_size_is_one_line(dataset, tiny_bundle, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "masks" / "s03.png").write_bytes((data / "masks" / "s04.png").read_bytes())
    line = _one_line_error(capsys, ["detector", *_args(data, data / "train.txt", tmp_path / "b", tiny_bundle.root,
                                                       "--val-metric", "boxes", "--epochs", "1")])
    assert "s03: mask" in line


def test_unwritable_out_missing_base_and_missing_weights_are_one_line(dataset, tiny_bundle, tmp_path, capsys,
                                                                   no_models):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(capsys, ["sam-box", *_args(dataset, dataset / "train.txt", blocker / "bundle",
                                                      tiny_bundle.root)])
    assert f"{blocker / 'bundle'}: cannot be a folder, {blocker} is a file" in line and "--out" in line
    base = tmp_path / "no-bundle"
    line = _one_line_error(capsys, ["sam-box", *_args(dataset, dataset / "train.txt", tmp_path / "b", base)])
    assert f"{base}: no bundle.json there" in line and "--base" in line
    weights = tmp_path / "no-gdino"
    line = _one_line_error(capsys, ["detector", *_args(dataset, dataset / "train.txt", tmp_path / "b",
                                                       tiny_bundle.root, "--detector-arch", "grounding_dino",
                                                       "--gdino-weights", str(weights))])
    assert f"{weights}: no such folder; pass --gdino-weights" in line


def test_flag_mistakes_are_one_line_too(dataset, tiny_bundle, tmp_path, capsys, no_models):
    line = _one_line_error(capsys, ["keypoints", *_args(dataset, dataset / "train.txt", tmp_path / "b",
                                                        tiny_bundle.root, "--val-metric", "boxes")])
    assert "--val-metric boxes is for the detector stage" in line
