"""cp-deploy batch --executor ray on a local two-CPU Ray cluster: the same outputs as the local
executor image for image (DICOM, NIfTI and multi-page TIFF too), a worker killed mid-run,
--resume, and the missing-extra message."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cp_deploy.cli import main
from cp_deploy.executors import PipelineFactory
from cp_deploy.executors.local import run_folder
from cp_deploy.executors.output import read_run_info
from cp_deploy.executors.ray import run_folder_ray
from cp_deploy.files import read_mask
from cp_deploy.pipeline import CurriculumPipeline
from tests.conftest import make_images

# Two actors on two logical CPUs still leave room for the decoding tasks.
POOL = {"num_workers": 2, "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    inp = tmp_path_factory.mktemp("ray_in")
    make_images(inp, 4)
    make_images(inp / "sub", 3, seed=1)
    cv2.imwrite(str(inp / "gray16.tif"), (np.random.default_rng(0).random((45, 61)) * 60000).astype(np.uint16))
    cv2.imwrite(str(inp / "gray.bmp"), np.full((30, 50), 128, np.uint8))
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return inp


@pytest.fixture(scope="module")
def local_run(tiny_bundle, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_out")
    run_folder(PipelineFactory(str(tiny_bundle.root))(), inputs, out, batch_size=2, overlays=True, progress=False)
    return out


def _records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("timings_ms", None)  # wall-clock times differ from run to run; error records have none
    return recs


def _close(a, b, tol: float) -> bool:
    """Equal structure; numbers within ``tol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def _assert_same_outputs(out: Path, ref: Path) -> None:
    """The same images, statuses, files and instances as the local run. Numbers agree closely,
    not bit for bit: Ray's actors run torch on 1 thread and the local run on 2, and torch's CPU
    kernels round differently with the thread count (a sub-pixel keypoint moved by 0.2 px, a
    mask by a pixel)."""
    recs, want = _records(out), _records(ref)
    assert [r["path"] for r in recs] == [r["path"] for r in want]
    assert len({r["path"] for r in recs}) == len(recs)
    for r, w in zip(recs, want):
        assert r.keys() == w.keys() and r["status"] == w["status"], r["path"]
        assert [k for k in r if k.endswith("error")] == [k for k in w if k.endswith("error")]
        if r["status"] != "ok":
            continue
        assert r["mask"] == w["mask"] and r.get("overlay") == w.get("overlay")
        assert abs(r["mask_area"] - w["mask_area"]) <= max(2, 0.01 * w["mask_area"]), r["path"]
        for a, b in zip(r["instances"], w["instances"]):
            assert _close(a["box"], b["box"], 0.05) and _close(a["score"], b["score"], 2e-3), r["path"]
            assert _close(a.get("points"), b.get("points"), 1.0), r["path"]
        assert len(r["instances"]) == len(w["instances"])
        m, mw = read_mask(out / r["mask"]), read_mask(ref / w["mask"])
        assert (m == mw).mean() > 0.99, r["mask"]
        if "overlay" in r:
            assert (out / r["overlay"]).stat().st_size > 0
    assert not (out / "results.jsonl.partial").exists()


def test_ray_outputs_equal_local(ray_cluster, tiny_bundle, inputs, local_run, tmp_path):
    out = tmp_path / "ray"
    s = run_folder_ray(PipelineFactory(str(tiny_bundle.root)), inputs, out, batch_size=2, overlays=True,
                       progress=False, **POOL)
    assert (s.total, s.ok, s.failed, s.skipped) == (10, 9, 1, 0)
    _assert_same_outputs(out, local_run)
    assert len(_records(out)) == 10


@pytest.fixture(scope="module")
def format_inputs(tmp_path_factory):
    """PNGs, a DICOM, a multi-frame DICOM, a NIfTI volume and a TIFF of two pages."""
    for extra in ("pydicom", "highdicom", "nibabel"):
        pytest.importorskip(extra, reason="needs the 'dicom' and 'nifti' extras (make test installs them)")
    import nibabel as nib

    from tests.deploy.test_formats import ct_pixels, enhanced_ct, make_dicom

    inp = tmp_path_factory.mktemp("ray_formats")
    make_images(inp, 2)
    make_dicom(inp / "ct.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=100, WindowWidth=600)
    enhanced_ct(inp / "cine.dcm")
    slices = [np.zeros((40, 36), np.int16) for _ in range(3)]
    for k, sl in enumerate(slices):
        cv2.circle(sl, (18, 20), 6 + 2 * k, 400, -1)
    vol = np.stack(slices, axis=2)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1])), inp / "vol.nii.gz")
    pages = [np.asarray(cv2.imread(str(inp / "img_000.png"), cv2.IMREAD_GRAYSCALE))] * 2
    assert cv2.imwritemulti(str(inp / "stack.tiff"), pages)
    return inp


def test_ray_reads_every_format_as_the_local_executor(ray_cluster, tiny_bundle, format_inputs, tmp_path):
    """Same records (timings aside), the same mask PNGs byte for byte, DICOM-SEG and mask NIfTI
    outputs that decode equal, and run.json. The local run uses one torch thread, as the actors
    do, so that the numbers agree exactly."""
    import nibabel as nib
    import pydicom

    threads = torch.get_num_threads()
    try:
        s_local = run_folder(PipelineFactory(str(tiny_bundle.root), threads=1), format_inputs, tmp_path / "local",
                             batch_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    s_ray = run_folder_ray(PipelineFactory(str(tiny_bundle.root)), format_inputs, tmp_path / "ray", batch_size=2,
                           progress=False, **POOL)
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert (s_ray.total, s_ray.ok, s_ray.failed, s_ray.skipped) == (s_local.total, s_local.ok, s_local.failed, 0)
    assert (s_local.ok, s_local.failed) == (10, 0)  # 2 PNGs, ct, 2 cine frames, 3 slices, 2 pages
    recs = {r["path"]: r for r in _records(ray_out)}
    assert recs == {r["path"]: r for r in _records(local)}
    assert recs["cine.dcm"]["frames"] == 2 and recs["cine.dcm#f002"]["source"] == "cine.dcm"
    assert recs["stack.tiff"]["frames"] == 2 and recs["vol.nii.gz"]["frames"] == 3
    masks = sorted(p.relative_to(local).as_posix() for p in (local / "masks").rglob("*.png"))
    assert masks == sorted(p.relative_to(ray_out).as_posix() for p in (ray_out / "masks").rglob("*.png"))
    assert len(masks) == 10
    for m in masks:
        assert (ray_out / m).read_bytes() == (local / m).read_bytes(), m
    for name in ("ct.dcm", "cine.dcm"):
        seg = recs[name]["outputs"]["dicom_seg"]
        got, want = (pydicom.dcmread(d / seg).pixel_array for d in (ray_out, local))
        np.testing.assert_array_equal(got, want)
    nii = recs["vol.nii.gz"]["outputs"]["nifti"]
    got, want = nib.load(ray_out / nii), nib.load(local / nii)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj))
    assert np.allclose(got.affine, want.affine)
    info = read_run_info(ray_out)
    assert info["settings"] == read_run_info(local)["settings"]
    assert (info["ok"], info["failed"], info["skipped"]) == (10, 0, 0)

    # --resume on Ray of the local run: a lost slice is redone, a lost DICOM-SEG is rebuilt from
    # the frame masks on disk without segmenting its frames again.
    seg = recs["cine.dcm"]["outputs"]["dicom_seg"]
    for lost in ("masks/vol_z001.png", recs["vol.nii.gz"]["outputs"]["nifti"], seg):
        (local / lost).unlink()
    s = run_folder_ray(PipelineFactory(str(tiny_bundle.root)), format_inputs, local, batch_size=2, progress=False,
                       resume=True, **POOL)
    assert (s.ok, s.failed, s.skipped) == (1, 0, 9)
    assert {r["path"]: r for r in _records(local)} == recs
    assert (local / "masks/vol_z001.png").read_bytes() == (ray_out / "masks/vol_z001.png").read_bytes()
    np.testing.assert_array_equal(pydicom.dcmread(local / seg).pixel_array, pydicom.dcmread(ray_out / seg).pixel_array)


@dataclass(frozen=True)
class KillOnce:
    """Builds the pipeline; the first worker to segment anything writes its PID to ``marker``
    and SIGKILLs its own process, as a crashed or preempted worker would."""

    factory: PipelineFactory
    marker: str

    def __call__(self) -> CurriculumPipeline:
        pipeline = self.factory()
        predict = pipeline.predict

        def predict_or_die(images):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return predict(images)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

        pipeline.predict = predict_or_die
        return pipeline

    @property
    def bundle(self) -> str | None:
        return self.factory.bundle

    def settings(self, slice_axis: int | None = None, bundle=None) -> dict:
        return self.factory.settings(slice_axis, bundle)


def test_killed_worker_is_retried_and_every_image_done_once(ray_cluster, tiny_bundle, inputs, local_run, tmp_path):
    marker = tmp_path / "killed.pid"
    out = tmp_path / "ray"
    s = run_folder_ray(KillOnce(PipelineFactory(str(tiny_bundle.root)), str(marker)), inputs, out,
                       batch_size=2, overlays=True, progress=False, **POOL)
    pid = int(marker.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker really died
    assert (s.ok, s.failed) == (9, 1)
    _assert_same_outputs(out, local_run)


def test_cli_resume_on_ray_redoes_only_what_is_missing(ray_cluster, tiny_bundle, inputs, local_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    (out / "masks" / "img_000.png").unlink()  # a lost output is redone
    results = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(results[:-2]) + "\n")  # records of a killed run
    (out / "results.jsonl.partial").write_text(results[-2] + "\n" + results[-1][:25])  # torn last line
    args = ["batch", "--input", str(inputs), "--output", str(out), "--bundle", str(tiny_bundle.root),
            "--executor", "ray", "--num-workers", "1", "--batch-size", "2", "--overlays", "--resume", "--no-progress"]
    assert main(args) == 1  # broken.jpg still fails
    printed = capsys.readouterr().out
    # Redone: the lost mask, the torn record and broken.jpg (failed images are retried); the
    # journal's complete record counts as done.
    assert "2 ok, 1 failed, 7 skipped (already done) of 10 images" in printed, printed
    _assert_same_outputs(out, local_run)


def test_missing_ray_names_the_extra(tiny_bundle, image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    rc = main(["batch", "--input", str(image_dir), "--output", str(tmp_path / "o"), "--bundle", str(tiny_bundle.root),
               "--executor", "ray", "--no-progress"])
    assert rc == 2
    assert "pip install 'curriculum-prompting[ray]'" in capsys.readouterr().err
