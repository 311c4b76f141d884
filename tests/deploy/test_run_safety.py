"""cp-deploy batch keeps a run's output folder consistent: settings recorded and checked on
--resume, no silent reuse of a full folder, no mask overwritten by another input, no output inside
the input, only its own temporaries removed, one run per folder, unreadable folders reported,
unusable outputs and bad flags refused before the models load, and a full disk mid-run reported
in one line with the journal kept for --resume."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from cp_deploy.cli import main
from cp_deploy.executors import PipelineFactory, core
from cp_deploy.executors.local import run_folder
from cp_deploy.executors.names import output_names
from cp_deploy.files import atomic_write_bytes, remove_stale_temporaries
from cp_deploy.journal import RunJournal
from cp_deploy.pipeline import PipelineOptions
from tests.conftest import make_images

LOCK = ".cp-deploy.lock"


def _lines(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _batch(inp: Path, out: Path, bundle, *extra: str) -> int:
    return main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(bundle.root), "--no-progress",
                 *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cp-deploy: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if the networks are built: these errors must come before that."""
    def build(self, bundle=None):
        raise AssertionError("the models were loaded before the error")

    monkeypatch.setattr(PipelineFactory, "__call__", build)


def test_journal_load_skips_lines_without_a_path(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"x")
    (tmp_path / "results.jsonl").write_text(
        '{"path":"a.png","status":"ok","mask":"masks/a.png"}\n{"status":"ok"}\n[1, 2]\nnot json\n')
    (tmp_path / "results.jsonl.partial").write_text('{"path":7}\n{"path":"b.png","sta')
    j = RunJournal(tmp_path)
    j.load()
    assert j.done() == {"a.png"}
    assert j.bad_lines == ["results.jsonl line 2: no 'path' key", "results.jsonl line 3: no 'path' key",
                           "results.jsonl line 4: not valid JSON", "results.jsonl.partial line 1: no 'path' key"]


def test_resume_with_other_settings_is_refused(tiny_bundle, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 2)
    assert _batch(inp, out, tiny_bundle) == 0
    info = json.loads((out / "run.json").read_text())
    assert {"ok", "failed", "skipped", "seconds", "images_per_second", "batch_size"} <= info.keys()
    s = info["settings"]
    assert s["bundle"] == str(tiny_bundle.root.resolve()) and len(s["bundle_sha256"]) == 64
    assert s["engine"] == "torch" and s["score_threshold"] == 0.05 and s["max_instances"] == 3  # bundle defaults
    masks = {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    capsys.readouterr()

    assert _batch(inp, out, tiny_bundle, "--resume", "--score-threshold", "0.9", "--mode", "top1") == 2
    err = _one_error_line(capsys)
    assert "score_threshold: 0.05 then, 0.9 now" in err and "mode" in err and "--overwrite" in err
    other = tmp_path / "bundle_copy"
    shutil.copytree(tiny_bundle.root, other)
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(other), "--no-progress",
                 "--resume"]) == 2
    assert "bundle" in _one_error_line(capsys)
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == masks
    assert _batch(inp, out, tiny_bundle, "--resume", "--batch-size", "2", "--workers", "1") == 0  # same settings

    (out / "run.json").unlink()  # as an older cp-deploy left it: a journal, no settings
    assert _batch(inp, out, tiny_bundle, "--resume") == 2
    assert "recorded no settings" in _one_error_line(capsys)


def test_settings_cover_what_changes_masks_only(tiny_bundle, tmp_path):
    root = str(tiny_bundle.root)
    base = PipelineFactory(root).settings()
    assert PipelineFactory(root, threads=3, compile=True).settings() == base
    make_images(tmp_path / "in", 1)
    run_folder(PipelineFactory(root)(), tmp_path / "in", tmp_path / "out", progress=False)  # a pipeline built by hand
    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"] == base
    assert PipelineFactory(root, precision="bf16").settings()["precision"] == "bf16"
    graphs = PipelineFactory(root, engine="onnxruntime", precision="bf16").settings()
    assert graphs["engine"] == "onnxruntime" and graphs["precision"] is None  # graphs carry their own
    assert PipelineFactory(root, options=PipelineOptions(prompts="box")).settings()["prompts"] == "box"
    assert PipelineFactory(root).settings(slice_axis=1)["slice_axis"] == 1


def test_non_empty_output_needs_resume_or_overwrite(tiny_bundle, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 3)
    assert _batch(inp, out, tiny_bundle, "--overlays") == 0
    (out / "notes.txt").write_text("mine")
    (out / "eval.csv").write_text("old")
    (inp / "img_002.png").unlink()
    capsys.readouterr()
    assert _batch(inp, out, tiny_bundle) == 2
    err = _one_error_line(capsys)
    assert "not empty" in err and "--resume" in err and "--overwrite" in err
    assert _batch(inp, out, tiny_bundle, "--resume", "--overwrite") == 2
    _one_error_line(capsys)

    assert _batch(inp, out, tiny_bundle, "--overwrite") == 0
    assert sorted(_lines(out)) == ["img_000.png", "img_001.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["img_000.png", "img_001.png"]  # old mask gone
    assert not (out / "overlays").exists() and not (out / "eval.csv").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_mask_names_of_frames_and_images_never_collide():
    names = output_names([Path("cine.dcm"), Path("cine_f001.png"), Path("vol.nii.gz"), Path("vol_z000.png"),
                          Path("scan.tif"), Path("scan_p002.jpg"), Path("photo.jpg"), Path("photo_f001.png"),
                          Path("a/b_f2.png")])
    assert names == {"cine.dcm": "cine.png", "cine_f001.png": "cine_f001.png.png", "vol.nii.gz": "vol.png",
                     "vol_z000.png": "vol_z000.png.png", "scan.tif": "scan.png", "scan_p002.jpg": "scan_p002.jpg.png",
                     "photo.jpg": "photo.png", "photo_f001.png": "photo_f001.png", "a/b_f2.png": "a/b_f2.png"}


def test_nifti_slice_and_image_of_the_same_mask_name_both_kept(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 1)
    sl = np.zeros((40, 36), np.int16)
    cv2.circle(sl, (18, 20), 8, 400, -1)
    vol = np.stack([sl, sl], axis=2)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1])), inp / "vol.nii.gz")
    shutil.copy(inp / "img_000.png", inp / "vol_z000.png")
    run_folder(PipelineFactory(str(tiny_bundle.root))(), inp, out, progress=False)
    rec = _lines(out)
    assert rec["vol.nii.gz#z000"]["mask"] != rec["vol_z000.png"]["mask"]
    assert rec["vol_z000.png"]["status"] == rec["vol.nii.gz#z000"]["status"] == "ok"
    assert cv2.imread(str(out / rec["vol_z000.png"]["mask"])).shape[:2] == (96, 128)
    assert cv2.imread(str(out / rec["vol.nii.gz#z000"]["mask"])).shape[:2] == (36, 40)  # slices are shown x by y


def test_writer_never_overwrites_another_inputs_mask(tiny_bundle, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 2)
    monkeypatch.setattr(core, "output_names", lambda files: {f.as_posix(): "same.png" for f in files})
    summary = run_folder(PipelineFactory(str(tiny_bundle.root))(), inp, out, progress=False)
    rec = _lines(out)
    assert rec["img_000.png"]["status"] == "ok" and rec["img_001.png"]["status"] == "error"
    assert "masks/same.png" in rec["img_001.png"]["error"] and "img_000.png" in rec["img_001.png"]["error"]
    assert summary.ok == 1 and summary.failed == 1
    assert cv2.imread(str(out / "masks/same.png")).shape[:2] == (96, 128)  # img_000's size, not img_001's


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_input_is_refused(tiny_bundle, tmp_path, capsys, no_models, where):
    inp = tmp_path / "in"
    make_images(inp, 1)
    out = inp if where == "same" else inp / "results"
    assert _batch(inp, out, tiny_bundle) == 2
    assert "inside --input" in _one_error_line(capsys)
    assert not (inp / "masks").exists()


def test_only_cp_deploys_own_temporaries_are_removed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst))[1])
    atomic_write_bytes(out / "masks" / "a.png", b"x")
    monkeypatch.undo()
    own = [out / "masks" / "sub" / seen[0], out / "overlays" / ".a.jpg.cp-abcd_123.tmp",
           out / ".run.json.cp-zz99zz99.tmp"]
    users = [out / ".notes.tmp", out / "masks" / ".a.png.1234.tmp", out / "docs" / ".draft.cp-abcd1234.tmp",
             out / "masks" / "keep.tmp"]
    for p in own + users:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert remove_stale_temporaries(out) == 3
    assert not any(p.exists() for p in own) and all(p.exists() for p in users)


def _hold_lock(out: Path, holder: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(holder).encode())
    return fd


def test_second_run_on_the_same_output_is_refused(tiny_bundle, tmp_path, capsys, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 2)
    fd = _hold_lock(out, {"pid": 4242, "host": "node7", "since": "2026-01-02 03:04:05", "command": "cp-deploy batch"})
    try:
        with monkeypatch.context() as m:
            m.setattr(PipelineFactory, "__call__", lambda self, bundle=None: pytest.fail("models loaded"))
            assert _batch(inp, out, tiny_bundle) == 2
        err = _one_error_line(capsys)
        assert "pid 4242 on node7 since 2026-01-02 03:04:05" in err and "another --output" in err
        assert not (out / "masks").exists()
    finally:
        os.close(fd)
    # The lock file of a run that is gone (its flock went with it) does not block.
    assert _batch(inp, out, tiny_bundle) == 0

    # A run that raises still releases the lock.
    def broken(self, bundle=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(PipelineFactory, "__call__", broken)
    with pytest.raises(KeyboardInterrupt):
        run_folder(PipelineFactory(str(tiny_bundle.root)), inp, out, progress=False, resume=True)
    os.close(_hold_lock(out, {}))


def test_ray_driver_takes_the_same_lock(tiny_bundle, tmp_path, monkeypatch):
    import ray

    from cp_deploy.errors import InputError
    from cp_deploy.executors.ray import run_folder_ray

    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 1)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started though the folder is locked"))
    fd = _hold_lock(out, {"pid": 99, "host": "h", "since": "now", "command": "x"})
    try:
        with pytest.raises(InputError, match="pid 99 on h"):
            run_folder_ray(PipelineFactory(str(tiny_bundle.root)), inp, out, progress=False)
    finally:
        os.close(fd)


def test_unreadable_subfolder_is_an_error_record(tiny_bundle, tmp_path, capsys, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 1)
    make_images(inp / "locked", 2)
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, so deny the listing here
        if Path(path) == inp / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert _batch(inp, out, tiny_bundle) == 1
    assert "1 ok, 1 failed" in capsys.readouterr().out
    rec = _lines(out)
    assert rec["locked"]["status"] == "error"
    assert str(inp / "locked") in rec["locked"]["error"] and "Permission denied" in rec["locked"]["error"]
    assert "readable" in rec["locked"]["error"]
    monkeypatch.undo()
    assert _batch(inp, out, tiny_bundle, "--resume") == 0  # readable again: its images are done, the error gone
    assert sorted(_lines(out)) == ["img_000.png", "locked/img_000.png", "locked/img_001.png"]


def test_unusable_output_fails_before_the_models_load(tiny_bundle, tmp_path, capsys, monkeypatch, no_models):
    inp = tmp_path / "in"
    make_images(inp, 1)
    (tmp_path / "file.txt").write_text("x")
    assert _batch(inp, tmp_path / "file.txt" / "out", tiny_bundle) == 2
    assert "file.txt" in _one_error_line(capsys)
    assert _batch(inp, tmp_path / "file.txt", tiny_bundle) == 2
    assert "is a file" in _one_error_line(capsys)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert _batch(inp, tmp_path / "out", tiny_bundle) == 2
    assert "No space left on device" in _one_error_line(capsys)


def test_disk_full_mid_run_is_one_line_and_resumable(tiny_bundle, tmp_path, capsys, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 3)
    real_fsync = os.fsync
    masks_written = []

    def fsync(fd):
        if "/masks/" in os.readlink(f"/proc/self/fd/{fd}"):
            if masks_written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            masks_written.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # one decode thread and one model worker: images reach the writer in order
    assert _batch(inp, out, tiny_bundle, "--workers", "1", "--model-workers", "1") == 1
    err = _one_error_line(capsys)
    assert str(out / "masks" / "img_001.png") in err and "No space left on device" in err
    assert "free space, then rerun with --resume" in err
    journal = (out / "results.jsonl.partial").read_text().splitlines()
    assert [json.loads(line)["path"] for line in journal] == ["img_000.png"]
    assert json.loads((out / "run.json").read_text())["settings"]["engine"] == "torch"  # written before image 1
    assert not [p for p in out.rglob("*.tmp")]
    monkeypatch.undo()
    assert _batch(inp, out, tiny_bundle, "--resume") == 0
    assert "2 ok, 0 failed, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["gpu", "0", "cuda:x"])
def test_a_misspelt_device_is_a_usage_error_while_parsing(tmp_path, capsys, device):
    with pytest.raises(SystemExit) as e:
        main(["batch", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--device", device])
    assert e.value.code == 2 and f"'{device}' is not a device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "cuda:1"], "no CUDA GPU"),
    (["--engine", "trt"], "--engine trt: no CUDA GPU"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-3"], "--batch-size -3: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be at least 0"),
    (["--threads", "-2"], "--threads -2: must be at least 0"),
    (["--num-workers", "-1"], "--num-workers -1: must be at least 1"),
])
def test_bad_device_and_counts_fail_before_the_models_load(tiny_bundle, tmp_path, capsys, monkeypatch, no_models,
                                                           flags, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    make_images(tmp_path / "in", 1)
    assert _batch(tmp_path / "in", tmp_path / "out", tiny_bundle, *flags) == 2
    assert expected in _one_error_line(capsys)


def test_device_index_beyond_the_gpus_is_refused(tiny_bundle, tmp_path, capsys, monkeypatch, no_models):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    make_images(tmp_path / "in", 1)
    assert _batch(tmp_path / "in", tmp_path / "out", tiny_bundle, "--device", "cuda:2") == 2
    assert re.search(r"has 2 CUDA GPU\(s\); pass cuda:0 to cuda:1", _one_error_line(capsys))
