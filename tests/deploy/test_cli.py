"""cp-deploy batch and eval end to end: outputs, errors, resume, and a killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.bundle import load_bundle
from cp_deploy.cli import build_parser, main
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.errors import BundleError
from cp_deploy.executors.local import run_folder
from cp_deploy.journal import RunJournal
from cp_deploy.pipeline import CurriculumPipeline
from tests.conftest import make_images


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_batch_writes_masks_overlays_and_results(tiny_bundle, tmp_path):
    inp = tmp_path / "in"
    make_images(inp / "sub", 2)
    cv2.imwrite(str(inp / "gray16.tif"), (np.random.default_rng(0).random((45, 61)) * 60000).astype(np.uint16))
    cv2.imwrite(str(inp / "gray.bmp"), np.full((30, 50), 128, np.uint8))
    out = tmp_path / "out"
    rc = main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
               "--overlays", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    lines = _lines(out)
    assert [r["path"] for r in lines] == ["gray.bmp", "gray16.tif", "sub/img_000.png", "sub/img_001.png"]
    for r in lines:
        mask = cv2.imread(str(out / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (r["height"], r["width"]) and set(np.unique(mask)) <= {0, 255}
        assert (out / r["overlay"]).is_file()
        assert {"encode", "detect", "box", "keypoints", "refine", "decode", "write"} <= set(r["timings_ms"])
        assert int((mask > 0).sum()) == r["mask_area"]
    assert cv2.imread(str(out / "masks/gray16.png")).shape[:2] == (45, 61)
    inst = next(r for r in lines if r["instances"])["instances"][0]
    assert len(inst["box"]) == 4 and len(inst["points"]) == 8 and "score" in inst
    assert not (out / "results.jsonl.partial").exists()


def test_corrupt_file_is_recorded_and_run_goes_on(tiny_bundle, tmp_path, capsys):
    inp = tmp_path / "in"
    make_images(inp, 2)
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inp / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root), "--no-progress"])
    assert rc == 1
    by_path = {r["path"]: r for r in _lines(out)}
    assert by_path["broken.jpg"]["status"] == "error" and "broken.jpg" in by_path["broken.jpg"]["error"]
    assert "re-export" in by_path["empty.png"]["error"]
    assert by_path["img_000.png"]["status"] == "ok"
    assert "2 ok, 2 failed" in capsys.readouterr().out


def test_empty_folder_is_a_clear_error(tiny_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["batch", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
               "--bundle", str(tiny_bundle.root)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no images found under" in err and str(tmp_path / "empty") in err


def test_missing_bundle_file_names_file_and_key(tiny_bundle, tmp_path, capsys):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, broken)
    (broken / "keypoints.safetensors").unlink()
    with pytest.raises(BundleError, match=r"keypoints\.safetensors.*'keypoints\.file'"):
        load_bundle(broken)
    rc = main(["batch", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--bundle", str(broken)])
    assert rc == 2 and "keypoints.safetensors" in capsys.readouterr().err
    (broken / "bundle.json").unlink()
    with pytest.raises(BundleError, match="bundle.json"):
        load_bundle(broken)


def test_corrupt_weight_file_fails_its_hash(tiny_bundle, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, broken)
    with open(broken / "detector.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match=r"detector\.safetensors.*sha256"):
        load_bundle(broken)


def _count_encoded(engine):
    seen = []
    orig = engine.encode

    def encode(x):
        seen.append(x.shape[0])
        return orig(x)

    engine.encode = encode
    return seen


def test_resume_after_interruption(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 6)
    engine = TorchEngine(tiny_bundle)
    pipe = CurriculumPipeline(tiny_bundle, engine)
    real_predict = pipe.predict
    calls = {"n": 0}

    def flaky(images, boxes=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the third batch
        return real_predict(images, boxes)

    pipe.predict = flaky
    with pytest.raises(KeyboardInterrupt):
        run_folder(pipe, inp, out, batch_size=1, progress=False)
    assert [r["path"] for r in _lines(out)] == ["img_000.png", "img_001.png"]
    masks_before = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}

    pipe.predict = real_predict
    seen = _count_encoded(engine)
    summary = run_folder(pipe, inp, out, batch_size=2, resume=True, progress=False)
    assert summary.skipped == 2 and summary.ok == 4 and sum(seen) == 4  # nothing redone
    assert [r["path"] for r in _lines(out)] == [f"img_{i:03d}.png" for i in range(6)]
    assert all((out / r["mask"]).is_file() for r in _lines(out))
    for name, mtime in masks_before.items():
        assert (out / "masks" / name).stat().st_mtime_ns == mtime


def test_torn_journal_line_is_ignored(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"x")
    (tmp_path / "results.jsonl.partial").write_text(
        '{"path":"a.png","status":"ok","mask":"masks/a.png"}\n{"path":"b.png","sta'
    )
    j = RunJournal(tmp_path)
    j.load()
    assert j.done() == {"a.png"}


def test_killed_process_loses_nothing(tiny_bundle, tmp_path):
    """SIGKILL a real cp-deploy run mid-way, then --resume: every image ends up done once."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 40, sizes=((200, 260),))
    cmd = [sys.executable, "-m", "cp_deploy.cli", "batch", "--input", str(inp), "--output", str(out),
           "--bundle", str(tiny_bundle.root), "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "results.jsonl.partial"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for this check)")
    assert not (out / "results.jsonl").exists() or len(_lines(out)) < 40
    assert subprocess.run([*cmd, "--resume"], capture_output=True).returncode == 0
    lines = _lines(out)
    assert sorted(r["path"] for r in lines) == [f"img_{i:03d}.png" for i in range(40)]
    assert all(r["status"] == "ok" and (out / r["mask"]).is_file() for r in lines)
    assert not list(out.rglob("*.tmp"))


def test_resume_removes_half_written_outputs(tiny_bundle, tmp_path):
    """A SIGKILL during an atomic write leaves its temporary file; the next run deletes it (the
    kill test above catches that only when the kill lands mid-write)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 2, sizes=((64, 80),))
    stale = out / "masks" / ".img_000.png.cp-abc12_89.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    keep = out / "masks" / "notes.tmp"  # not an atomic write's temporary: left alone
    keep.write_bytes(b"user file")
    (out / "masks" / ".draft.abc123.tmp").write_bytes(b"user file too")  # the old, ambiguous name form
    cmd = [sys.executable, "-m", "cp_deploy.cli", "batch", "--input", str(inp), "--output", str(out),
           "--bundle", str(tiny_bundle.root), "--no-progress", "--resume"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert not stale.exists() and keep.exists() and (out / "masks" / ".draft.abc123.tmp").exists()
    assert len(_lines(out)) == 2


def test_eval_matches_hand_computed(tmp_path, capsys):
    pred, gt = tmp_path / "pred" / "masks", tmp_path / "gt"
    pred.mkdir(parents=True)
    gt.mkdir()
    a_gt = np.zeros((4, 4), np.uint8)
    a_gt[0, :3] = 255  # 3 px
    a_pr = np.zeros((4, 4), np.uint8)
    a_pr[0, 1:4] = 255  # 3 px, 2 shared: Dice 4/6, IoU 2/4
    b_gt = np.zeros((3, 5), np.uint8)
    b_gt[1, 1] = 255  # 1 px, prediction empty: Dice 0, IoU 0
    cv2.imwrite(str(gt / "a.png"), a_gt)
    cv2.imwrite(str(pred / "a.png"), a_pr)
    cv2.imwrite(str(gt / "b.jpg"), b_gt)  # lossy GT is thresholded at 128
    cv2.imwrite(str(pred / "b.png"), np.zeros((3, 5), np.uint8))
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(gt), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mDice"] == pytest.approx((4 / 6 + 0) / 2) and s["mIoU"] == pytest.approx((0.5 + 0) / 2)
    rows = (tmp_path / "pred" / "eval.csv").read_text().splitlines()
    assert rows[0] == "image,dice,iou" and rows[1].startswith("a,0.666667,0.500000")


def test_every_flag_has_help():
    from cp_train.cli import build_parser as train_parser
    from export.cli import build_parser as export_parser

    parsers = [train_parser()]
    for parser in (build_parser(), export_parser()):
        parsers += parser._subparsers._group_actions[0].choices.values()
    for sub in parsers:
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"
