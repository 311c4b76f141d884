"""DICOM and NIfTI in, DICOM-SEG and mask NIfTI out: readers, write-back, batch runs and resume.

Every test file is made here with pydicom, highdicom and nibabel; the headers carry a made-up
patient so the tests can check that no name, ID or date leaks into the run's outputs.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="needs the 'dicom' extra (make test installs it)")
hd = pytest.importorskip("highdicom", reason="needs the 'dicom' extra (make test installs it)")
nib = pytest.importorskip("nibabel", reason="needs the 'nifti' extra (make test installs it)")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG2MPML,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cp_deploy.cli import main  # noqa: E402
from cp_deploy.engines.torch import TorchEngine  # noqa: E402
from cp_deploy.errors import InputError, MissingExtraError  # noqa: E402
from cp_deploy.executors.local import run_folder  # noqa: E402
from cp_deploy.files import discover_images  # noqa: E402
from cp_deploy.formats import ReadOptions, discover_inputs, is_input_file, read_input  # noqa: E402
from cp_deploy.formats.nifti import default_slice_axis, image_to_slice, slice_to_image  # noqa: E402
from cp_deploy.pipeline import CurriculumPipeline  # noqa: E402
from tests.conftest import make_images  # noqa: E402

PHI = ("Doe^Jane", "Doe", "PID-4711", "19700101", "20240102", "ACC-9917", "General Hospital")


def make_dicom(path: Path | None, pixels: np.ndarray, photometric: str = "MONOCHROME2", *, geometry: bool = True,
               sop_class: str = CTImageStorage, bits: int | None = None, **attrs) -> Dataset:
    """A DICOM Part 10 file with a made-up patient; ``geometry`` adds a frame of reference."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PID-4711", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "ACC-9917", "7"
    ds.InstitutionName, ds.ReferringPhysicianName = "General Hospital", "Who^Doctor"
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.SeriesNumber, ds.InstanceNumber = 3, 1
    if geometry:
        ds.FrameOfReferenceUID = generate_uid()
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.0
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    bits = bits or (8 if pixels.dtype == np.uint8 else 16)
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for k, v in attrs.items():
        setattr(ds, k, v)
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


def ct_pixels(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Stored values of a CT-like slice: a bright disc on a dim background, some noise, and a
    ramp over the full 12-bit range along the top rows (so a window has a linear part to show)."""
    rng = np.random.default_rng(seed)
    px = np.full((h, w), 900, np.float64) + rng.normal(0, 20, (h, w))
    cv2.circle(px, (w // 2, h // 2), min(h, w) // 4, 1300, -1)
    px[:4] = np.linspace(0, 4095, w)[None]
    return px.clip(0, 4095).astype(np.uint16)


def enhanced_ct(path: Path, n: int = 2, h: int = 40, w: int = 48) -> Dataset:
    """An enhanced multi-frame CT (per-frame plane positions) converted from a made-up series."""
    first = make_dicom(None, ct_pixels(h, w), RescaleSlope=1, RescaleIntercept=-1024)
    series = []
    for z in range(n):
        ds = make_dicom(None, ct_pixels(h, w, seed=z), RescaleSlope=1, RescaleIntercept=-1024,
                        ImagePositionPatient=[0, 0, 2.0 * z], InstanceNumber=z + 1)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        series.append(ds)
    enh = hd.legacy.LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=hd.UID(), series_number=4, sop_instance_uid=hd.UID(), instance_number=1
    )
    enh.save_as(path, enforce_file_format=True)
    return enh


# -- readers ------------------------------------------------------------------------------------

def _linear_window(hu: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), scaled to 0..255."""
    return np.clip(((hu - (c - 0.5)) / (w - 1) + 0.5), 0, 1) * 255


def test_rescale_then_first_window(tmp_path):
    px = ct_pixels()
    make_dicom(tmp_path / "ct.dcm", px, RescaleSlope=2, RescaleIntercept=-1024,
               WindowCenter=[1176, 40], WindowWidth=[600, 80])  # two windows: the first applies
    img = read_input(tmp_path / "ct.dcm").frames[0]
    hu = px.astype(np.float64) * 2 - 1024
    assert img.dtype == np.uint8 and img.shape == px.shape
    np.testing.assert_allclose(img, _linear_window(hu, 1176, 600), atol=1.0)
    assert 0 < img[:4].mean() < 255 and len(np.unique(img[:4])) > 5
    # Values outside the window saturate: the window's range, not the image's, maps to 0..255.
    assert img[hu <= 1176 - 300].max() == 0 and img[hu >= 1176 + 300].min() == 255
    assert (img[4:] == 0).mean() > 0.5 and (img[4:] == 255).mean() > 0.1


def test_monochrome1_is_inverted(tmp_path):
    px = ct_pixels()
    make_dicom(tmp_path / "m2.dcm", px, WindowCenter=1100, WindowWidth=600)
    make_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1", WindowCenter=1100, WindowWidth=600)
    m2, m1 = read_input(tmp_path / "m2.dcm").frames[0], read_input(tmp_path / "m1.dcm").frames[0]
    np.testing.assert_array_equal(m1, 255 - m2)
    # Without a window, the inversion keeps the data's range and reverses its order.
    make_dicom(tmp_path / "raw1.dcm", px, "MONOCHROME1")
    raw = read_input(tmp_path / "raw1.dcm").frames[0]
    assert raw.max() == px.max() and raw.min() == px.min()
    assert raw[px == px.max()].max() == px.min()


def test_voi_lut_sequence_is_applied(tmp_path):
    px = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = np.arange(255, -1, -1, dtype=np.uint16).tobytes()  # a reversing LUT
    ds = make_dicom(None, px, bits=8)
    ds.VOILUTSequence = [lut]
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    img = read_input(tmp_path / "lut.dcm").frames[0]
    np.testing.assert_array_equal(img, 255 - px)


def test_rgb_and_ybr_become_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    make_dicom(tmp_path / "rgb.dcm", rgb, "RGB", geometry=False, sop_class=SecondaryCaptureImageStorage)
    np.testing.assert_array_equal(read_input(tmp_path / "rgb.dcm").frames[0], rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    make_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL", geometry=False, sop_class=SecondaryCaptureImageStorage)
    got = read_input(tmp_path / "ybr.dcm").frames[0]
    assert got.shape == rgb.shape and np.abs(got.astype(int) - rgb).max() <= 2


def test_compressed_syntaxes_decode(tmp_path):
    px = ct_pixels()
    ds = make_dicom(None, px)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert str(pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID) == RLELossless
    np.testing.assert_array_equal(read_input(tmp_path / "rle.dcm").frames[0], px)

    gray = cv2.GaussianBlur((np.random.default_rng(2).random((48, 64)) * 255).astype(np.uint8), (7, 7), 0)
    ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    ds = make_dicom(None, gray, geometry=False, sop_class=SecondaryCaptureImageStorage)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    got = read_input(tmp_path / "jpeg.dcm").frames[0]
    assert got.shape == gray.shape
    assert np.abs(got.astype(int) - cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)).max() <= 2


def test_syntax_without_handler_names_syntax_and_extra(tmp_path, monkeypatch):
    ds = make_dicom(None, ct_pixels())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3 not a real stream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"video\.dcm: no pixel-data decoder.*MPEG2 Main Profile"):
        read_input(tmp_path / "video.dcm")
    # A syntax pydicom knows whose handler is not installed: the message names the extra.
    from pydicom.pixels.decoders.base import Decoder

    ds = make_dicom(None, ct_pixels())
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(InputError, match=r"'RLE Lossless'.*pip install 'curriculum-prompting\[dicom\]'"):
        read_input(tmp_path / "rle.dcm")


def test_no_pixel_data_is_a_clear_error(tmp_path):
    ds = make_dicom(None, ct_pixels())
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"nopix\.dcm: the DICOM file has no pixel data"):
        read_input(tmp_path / "nopix.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"junk\.dcm: not a readable DICOM file"):
        read_input(tmp_path / "junk.dcm")


def test_multiframe_gives_one_image_per_frame(tmp_path):
    frames = np.stack([ct_pixels(seed=s) for s in range(3)])
    make_dicom(tmp_path / "mf.dcm", frames, NumberOfFrames=3, WindowCenter=1100, WindowWidth=800)
    d = read_input(tmp_path / "mf.dcm")
    assert d.labels == ["f001", "f002", "f003"] and len(d.frames) == 3
    np.testing.assert_allclose(d.frames[2], _linear_window(frames[2].astype(float), 1100, 800), atol=1.0)
    # Legacy multi-frame: no per-frame positions, so no SEG, and the reason is recorded.
    assert d.write_back is None and "no per-frame plane positions" in d.info["dicom_seg"]


def test_discovery_finds_dicom_by_preamble_and_nifti(tmp_path):
    make_dicom(tmp_path / "IM000001", ct_pixels())  # PACS exports often have no extension
    make_dicom(tmp_path / "1.2.826.0.1.3680043.8.498.1", ct_pixels())
    (tmp_path / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM")
    (tmp_path / "notes.txt").write_text("x" * 200)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), tmp_path / "p.nii")
    found = [p.as_posix() for p in discover_inputs(tmp_path)]
    assert found == ["1.2.826.0.1.3680043.8.498.1", "IM000001", "p.nii", "v.nii.gz"]
    with pytest.raises(InputError, match="no images found"):
        discover_images(tmp_path)  # plain discovery (eval's) still takes images only
    assert not is_input_file(tmp_path / "notes.txt") and not is_input_file(tmp_path / "DICOMDIR")


def test_nifti_slicing_axis_and_orientation(tmp_path):
    vol = np.random.default_rng(3).random((20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.9, 3.0, 1])), tmp_path / "v.nii.gz")
    d = read_input(tmp_path / "v.nii.gz")
    assert d.info["slice_axis"] == 2 and d.labels == [f"z{k:03d}" for k in range(5)]
    assert d.frames[0].shape == (24, 20)  # rows along y, as viewers show an axial slice
    np.testing.assert_array_equal(image_to_slice(d.frames[3]), vol[:, :, 3])
    d0 = read_input(tmp_path / "v.nii.gz", ReadOptions(slice_axis=0))
    assert len(d0.frames) == 20 and d0.labels[0] == "x000"
    assert default_slice_axis((20, 24, 5), (2.5, 1.0, 1.0)) == 0
    assert default_slice_axis((20, 24, 5), (1.0, 1.0, 1.0)) == 2  # isotropic: the last axis
    assert default_slice_axis((20, 24, 1), (1.0, 1.0, 1.0)) == 2
    m = np.random.default_rng(4).random((7, 9)) > 0.5
    np.testing.assert_array_equal(slice_to_image(image_to_slice(m)), m)
    nib.save(nib.Nifti1Image(vol[:, :, 0], np.eye(4)), tmp_path / "flat.nii")
    flat = read_input(tmp_path / "flat.nii")
    assert flat.labels == [""] and flat.frames[0].shape == (24, 20)


def test_missing_extras_name_the_extra(tmp_path, monkeypatch):
    make_dicom(tmp_path / "a.dcm", ct_pixels())
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'curriculum-prompting\[dicom\]'"):
        read_input(tmp_path / "a.dcm")
    with pytest.raises(MissingExtraError, match=r"pip install 'curriculum-prompting\[nifti\]'"):
        read_input(tmp_path / "b.nii.gz")


# -- batch runs -------------------------------------------------------------------------------

def _lines(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0


def test_batch_dicom_folder_to_dicom_seg(tiny_bundle, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    ct = make_dicom(inp / "ct.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024,
                    WindowCenter=100, WindowWidth=600)
    extless = make_dicom(inp / "IM000002", ct_pixels(seed=5), "MONOCHROME1")
    enh = enhanced_ct(inp / "enhanced.dcm")
    rgb = (np.random.default_rng(1).random((36, 44, 3)) * 255).astype(np.uint8)
    sc = make_dicom(inp / "photo.dcm", rgb, "RGB", geometry=False, sop_class=SecondaryCaptureImageStorage)
    nopix = make_dicom(None, ct_pixels())
    del nopix.PixelData
    nopix.save_as(inp / "nopix.dcm", enforce_file_format=True)

    rc = main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
               "--overlays", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 1  # the file without pixel data
    rec = _lines(out)
    assert rec["nopix.dcm"]["status"] == "error" and "no pixel data" in rec["nopix.dcm"]["error"]
    assert "5 ok, 1 failed" in printed.out  # ct, IM000002, photo, 2 enhanced frames

    for name, src in (("ct.dcm", ct), ("IM000002", extless), ("photo.dcm", sc)):
        r = rec[name]
        assert r["status"] == "ok" and r["format"] == "dicom"
        seg_path = out / r["outputs"]["dicom_seg"]
        seg = hd.seg.segread(seg_path)
        assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 1
        assert seg.StudyInstanceUID == src.StudyInstanceUID
        ref_series = seg.ReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        if "PixelSpacing" in src:
            measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in src.PixelSpacing]
        png = _png(out / r["mask"])
        by_source = seg.get_pixels_by_source_instance(source_sop_instance_uids=[src.SOPInstanceUID])
        np.testing.assert_array_equal(by_source[0, ..., 0].astype(bool), png)
        np.testing.assert_array_equal(pydicom.dcmread(seg_path).pixel_array.astype(bool), png)

    # The enhanced multi-frame CT: one record per frame, one for the file, one SEG frame per frame.
    file_rec = rec["enhanced.dcm"]
    assert file_rec["status"] == "ok" and file_rec["frames"] == 2
    seg_path = out / file_rec["outputs"]["dicom_seg"]
    seg = hd.seg.segread(seg_path)
    got = seg.get_pixels_by_source_frame(source_sop_instance_uid=enh.SOPInstanceUID, source_frame_numbers=[1, 2])
    raw = pydicom.dcmread(seg_path).pixel_array
    # Geometry: each SEG frame lies where the source frame it derives from lies.
    def position(frame) -> tuple[float, ...]:
        return tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)

    src_pos = [position(f) for f in enh.PerFrameFunctionalGroupsSequence]
    assert sorted(src_pos) == [(0.0, 0.0, 0.0), (0.0, 0.0, 2.0)]
    for f in seg.PerFrameFunctionalGroupsSequence:
        ref = f.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enh.SOPInstanceUID
        assert position(f) == src_pos[int(ref.ReferencedFrameNumber) - 1]
    for i in range(2):
        frame = rec[f"enhanced.dcm#f{i + 1:03d}"]
        assert frame["source"] == "enhanced.dcm" and frame["mask"] == f"masks/enhanced_f{i + 1:03d}.png"
        png = _png(out / frame["mask"])
        np.testing.assert_array_equal(got[i, ..., 0].astype(bool), png)
        np.testing.assert_array_equal(raw[i].astype(bool), png)

    # No protected health information in the journal, the console or the report; no UIDs either.
    main(["report", str(out)])
    texts = [(out / "results.jsonl").read_text(), printed.out, printed.err, (out / "report.html").read_text()]
    for text in texts:
        for phi in PHI:
            assert phi not in text
        assert ct.StudyInstanceUID not in text and ct.SOPInstanceUID not in text


def test_include_uids_flag(tiny_bundle, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    ds = make_dicom(inp / "a.dcm", ct_pixels(32, 32))
    out = tmp_path / "out"
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--no-progress", "--include-uids"]) == 0
    r = _lines(out)["a.dcm"]
    assert r["uids"] == {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                         "sop_instance": ds.SOPInstanceUID}
    assert not any(phi in json.dumps(r) for phi in PHI)


def test_batch_nifti_volume_mask_and_resume(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    slices = [np.zeros((40, 36), np.int16) for _ in range(3)]
    for k, sl in enumerate(slices):
        cv2.circle(sl, (18, 20), 6 + 2 * k, 400, -1)
    vol = np.stack(slices, axis=2)
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), inp / "vol.nii.gz")
    nib.save(nib.Nifti1Image(vol[:, :, 1].astype(np.float32), affine), inp / "flat.nii")
    engine = TorchEngine(tiny_bundle)
    pipe = CurriculumPipeline(tiny_bundle, engine)
    real_predict = pipe.predict
    seen: list[int] = []

    def failing_third_slice(images, boxes=None):
        seen.append(len(images))
        if len(seen) == 3:  # flat.nii, then vol z000, z001, z002: fail z001
            raise RuntimeError("simulated engine failure")
        return real_predict(images, boxes)

    pipe.predict = failing_third_slice
    s1 = run_folder(pipe, inp, out, progress=False)
    rec = _lines(out)
    assert rec["vol.nii.gz#z001"]["status"] == "error" and rec["vol.nii.gz"]["status"] == "error"
    assert "1 of 3 frames failed" in rec["vol.nii.gz"]["error"] and not (out / "masks/vol.nii.gz").exists()
    assert s1.failed == 1 and s1.ok == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "masks").glob("vol_z*.png")}

    seen.clear()
    pipe.predict = lambda images, boxes=None: (seen.append(len(images)), real_predict(images, boxes))[1]
    s2 = run_folder(pipe, inp, out, progress=False, resume=True)
    assert seen == [1] and s2.ok == 1 and s2.skipped == 3 and s2.failed == 0  # only z001 redone
    for name, t in mtimes.items():
        assert (out / "masks" / name).stat().st_mtime_ns == t
    rec = _lines(out)
    assert rec["vol.nii.gz"]["status"] == "ok" and rec["vol.nii.gz"]["slice_axis"] == 2
    mask_img = nib.load(out / rec["vol.nii.gz"]["outputs"]["nifti"])
    assert mask_img.shape == vol.shape and np.allclose(mask_img.affine, affine)
    mask_vol = np.asanyarray(mask_img.dataobj)
    assert mask_vol.dtype == np.uint8 and set(np.unique(mask_vol)) <= {0, 1}
    for k in range(3):
        png = _png(out / rec[f"vol.nii.gz#z{k:03d}"]["mask"])
        np.testing.assert_array_equal(mask_vol[:, :, k].astype(bool), image_to_slice(png))
    flat = nib.load(out / rec["flat.nii"]["outputs"]["nifti"])
    assert flat.shape == (40, 36) and np.allclose(flat.affine, affine)
    flat_png = image_to_slice(_png(out / "masks/flat.png"))
    np.testing.assert_array_equal(np.asanyarray(flat.dataobj).astype(bool), flat_png)

    # A lost volume output is rebuilt from the frame masks on disk, without running the model.
    (out / "masks/vol.nii.gz").unlink()
    seen.clear()
    s3 = run_folder(pipe, inp, out, progress=False, resume=True)
    assert seen == [] and s3.skipped == 4 and (out / "masks/vol.nii.gz").is_file()
    assert np.array_equal(np.asanyarray(nib.load(out / "masks/vol.nii.gz").dataobj), mask_vol)


def test_batch_without_extras_reports_and_goes_on(tiny_bundle, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    make_dicom(inp / "a.dcm", ct_pixels(32, 32))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), inp / "v.nii.gz")
    make_images(inp, 1)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    s = run_folder(CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle)), inp, out, progress=False)
    rec = _lines(out)
    assert s.ok == 1 and s.failed == 2 and rec["img_000.png"]["status"] == "ok"
    assert "curriculum-prompting[dicom]" in rec["a.dcm"]["error"]
    assert "curriculum-prompting[nifti]" in rec["v.nii.gz"]["error"]


def test_seg_bytes_reads_back_with_pydicom(tmp_path):
    """The write-back alone, for a source without geometry: highdicom and pydicom agree."""
    src = make_dicom(tmp_path / "sc.dcm", (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8),
                     geometry=False, sop_class=SecondaryCaptureImageStorage)
    d = read_input(tmp_path / "sc.dcm")
    mask = np.zeros((20, 30), bool)
    mask[4:9, 3:21] = True
    kind, (suffix, data) = next(iter(d.write_back([mask]).items()))
    assert (kind, suffix) == ("dicom_seg", ".seg.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.BitsAllocated == 1 and np.array_equal(ds.pixel_array.astype(bool), mask)
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
