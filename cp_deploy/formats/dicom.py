"""DICOM in (pydicom) and DICOM-SEG out (highdicom).

Grayscale pixels go through the Modality LUT (rescale slope/intercept or a LUT), then the VOI
LUT or the first window (centre/width), mapped onto 0..255; MONOCHROME1 is inverted so that
bright means dense as in MONOCHROME2. Colour (RGB, YBR_*, PALETTE COLOR) becomes RGB. A
multi-frame file gives one frame per image. Names, IDs and dates never leave this module: the
metadata it returns holds UIDs only, and only when asked for, and its errors name elements
(keyword and tag), never their values.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cp_deploy import __version__
from cp_deploy.errors import EXTRA_HINT, InputError, MissingExtraError
from cp_deploy.files import check_pixel_budget
from cp_deploy.formats.base import Decoded, ReadOptions

if TYPE_CHECKING:
    from pydicom import Dataset

EXTRA = "dicom"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The Patient and General Study attributes a DICOM-SEG copies from its source. All are type 2
# (required, may be empty), so a source without one (anonymisers drop them) gets an empty one.
SEG_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")
SEG_COPIED = (*SEG_TYPE2_COPIED, "StudyInstanceUID", "SpecificCharacterSet")
PATIENT_SEX_VALUES = ("M", "F", "O", "")  # PS3.3 C.7.1.1: enumerated values
# Library errors that describe the file's structure only (no element values), kept verbatim.
STRUCTURAL_ERRORS = ("InvalidDicomError", "EOFError")
UNCOMPRESSED_FIX = "re-export the file uncompressed (Explicit VR Little Endian), e.g. from the PACS"
_LIBRARIES = ("pydicom", "highdicom")


def _quiet_libraries() -> None:
    """Keep pydicom's and highdicom's warnings and log records off the console.

    Both quote element values in them (``Invalid value for VR DA: '...'``, a patient name that
    "is potentially invalid"), and highdicom's loggers have no handler, so Python's last-resort
    handler would print them to stderr in a batch run. Our own errors say what failed instead.
    Filters are re-added on every call (an identical filter is not duplicated) because test
    runners and ``warnings.catch_warnings`` restore the filter list.
    """
    for name in _LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        logger = logging.getLogger(name)
        if not logger.propagate:
            continue
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _import_pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the pixel-data handlers live here
    except ImportError:
        return None
    _quiet_libraries()
    return pydicom


def _element(keyword: str) -> str:
    """``PatientBirthDate (0010,0030)``: how errors name an element, never with its value."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _withheld(e: BaseException) -> str:
    """An exception from pydicom or highdicom, described without its message.

    Their messages may quote element values (``Invalid value for VR DA: '...'``,
    ``invalid literal for int(): '19XX'``), so only the exception's type, where it was raised and,
    for a missing attribute, the element's keyword are kept; structural read errors are kept whole.
    """
    name = type(e).__name__
    if name in STRUCTURAL_ERRORS or isinstance(e, OSError):
        return f"{name}: {e}"
    missing = re.search(r"has no attribute '(\w+)'", str(e)) if isinstance(e, AttributeError) else None
    if missing:
        return f"the element {_element(missing.group(1))} is missing"
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" in {tb.tb_frame.f_globals.get('__name__', '?')}.{tb.tb_frame.f_code.co_name}" if tb else ""
    return f"{name}{where}; its message is withheld as it may quote patient data"


def _safe_uid(value: object) -> str:
    """A UID read from a file, printable whatever the file holds (a UID is at most 64 characters)."""
    text = str(value)
    return text if re.fullmatch(r"[0-9.]{1,64}", text) else ascii(text[:64])


def _modality(ds: Dataset) -> str:
    """The Modality if it is a well-formed code string (``CT``), else ``?``: a damaged file's
    Modality could hold any text, and it reaches results.jsonl."""
    value = str(ds.get("Modality", "") or "")
    return value if re.fullmatch(r"[A-Z0-9_ ]{1,16}", value) else "?"


def _check_decoder(path: Path, ds: Dataset) -> None:
    """Fail early, with the syntax and the fix, when no installed handler decodes the pixels."""
    from pydicom.pixels.decoders.base import get_decoder

    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        return
    if not tsyntax.is_transfer_syntax:  # a private or damaged file meta header
        raise InputError(
            f"{path}: the file's transfer syntax UID {_safe_uid(tsyntax)} is not a DICOM transfer syntax, "
            f"so its pixel data cannot be decoded; {UNCOMPRESSED_FIX}"
        )
    if not tsyntax.is_compressed:
        return
    name = f"'{tsyntax.name}' ({tsyntax})"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise InputError(
            f"{path}: no pixel-data decoder exists for the transfer syntax {name}; "
            "convert the file to an uncompressed or JPEG/RLE syntax first"
        ) from None
    if not decoder.is_available:
        raise InputError(
            f"{path}: the transfer syntax {name} needs a pixel-data handler that is not installed; "
            f"run: {EXTRA_HINT.format(extra=EXTRA)} (installs pylibjpeg and its plugins)"
        )


def _grayscale(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """Stored values -> display values: Modality LUT, VOI (mapped to uint8), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        # The VOI output range is fixed by the LUT or the window (not the image's own min/max),
        # so map it, not the data, onto 0..255: a dark image stays dark, as in a viewer.
        if "VOILUTSequence" in ds:
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            voi_in = np.rint(out).astype(np.int64)  # a LUT is indexed by integer values
        else:
            probe = np.array([-(2.0**40), 2.0**40])  # beyond any window: gives its output range
            lo, hi = sorted(float(v) for v in apply_voi_lut(probe, ds, index=0))
            voi_in = out
        out = apply_voi_lut(voi_in, ds, index=0).astype(np.float64)
        out = np.round((out - lo) * (255.0 / max(hi - lo, 1e-12))).clip(0, 255).astype(np.uint8)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            out = 255 - out
        return out
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out


def _frames(ds: Dataset, arr: np.ndarray) -> list[np.ndarray]:
    from pydicom.pixels import apply_color_lut

    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if n == 1:
        arr = arr[None]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp == 1 and photometric == "PALETTE COLOR":
        return list(apply_color_lut(arr, ds))
    if spp == 1:
        return [_grayscale(ds, a) for a in arr]
    # YBR_* needs nothing here: pydicom's pixel_array already returns RGB for it (as_rgb).
    return [np.ascontiguousarray(a) for a in arr]


def read_dicom(path: str | Path, options: ReadOptions | None = None) -> Decoded:
    """One DICOM file -> its frames, with a write-back to a DICOM-SEG that references it."""
    path = Path(path)
    options = options or ReadOptions()
    pydicom = _import_pydicom()
    if pydicom is None:
        raise MissingExtraError.for_file(path, "DICOM files", EXTRA)
    try:
        ds = pydicom.dcmread(path, force=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable DICOM file ({_withheld(e)}); "
                         "check it with dciodvfy (dicom3tools) or re-export it") from None
    try:
        return _decode(path, ds, options)
    except InputError:
        raise
    except Exception as e:  # pydicom's and highdicom's messages may quote element values
        raise InputError(f"{path}: cannot read the DICOM image ({_withheld(e)}); "
                         "check the file with dciodvfy (dicom3tools) or re-export it") from None


def _decode(path: Path, ds: Dataset, options: ReadOptions) -> Decoded:
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise InputError(
            f"{path}: the DICOM file has no pixel data (modality {_modality(ds)}, "
            "e.g. a report or a presentation state); nothing to segment"
        )
    check_pixel_budget(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), options.max_pixels,
                       "frames")
    _check_decoder(path, ds)
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "?")
        raise InputError(
            f"{path}: cannot decode the pixel data (transfer syntax {getattr(ts, 'name', ts)}; {_withheld(e)}); "
            f"the pixel data may be truncated or disagree with Rows, Columns, Bits Allocated, Samples per Pixel "
            f"or Number of Frames; {UNCOMPRESSED_FIX}"
        ) from None
    frames = _frames(ds, arr)
    info: dict = {"format": "dicom", "modality": _modality(ds) if "Modality" in ds else ""}
    if options.include_uids:
        info["uids"] = {
            "study": str(ds.get("StudyInstanceUID", "")),
            "series": str(ds.get("SeriesInstanceUID", "")),
            "sop_instance": str(ds.get("SOPInstanceUID", "")),
        }

    def write_back(masks: list[np.ndarray]) -> dict[str, tuple[str, bytes]]:
        try:
            return {"dicom_seg": (".seg.dcm", segmentation_bytes(ds, masks))}
        except MissingExtraError:
            raise
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        except Exception as e:  # highdicom's messages may quote the patient attributes it copies
            raise InputError(f"{path}: highdicom could not write the DICOM-SEG ({_withheld(e)})") from None

    reason = seg_unsupported_reason(ds, len(frames))
    if reason:
        info["dicom_seg"] = f"not written: {reason}"
    return Decoded(frames=frames, write_back=None if reason else write_back, info=info)


def seg_unsupported_reason(ds: Dataset, n_frames: int) -> str | None:
    """Why no DICOM-SEG can reference this source, or None.

    A SEG frame must sit on a source frame's plane; a multi-frame source gives one plane per
    frame only when it has a frame of reference and per-frame positions (enhanced CT/MR/US
    volumes do, cine loops and legacy multi-frame files do not).
    """
    if n_frames == 1:
        return None
    try:
        from highdicom.spatial import get_image_coordinate_system
        from highdicom.utils import get_plane_positions_of_image
    except ImportError:
        return None  # segmentation_bytes reports the missing extra
    if get_image_coordinate_system(ds) is None:
        return "a multi-frame source without a frame of reference (e.g. a cine loop) has no frame geometry"
    try:
        n_planes = len(get_plane_positions_of_image(ds))
    except Exception:
        n_planes = 0
    if n_planes != n_frames:
        return "the multi-frame source has no per-frame plane positions (not an enhanced multi-frame image)"
    return None


def _invalid_copied_element(source: Dataset) -> str | None:
    """The first attribute the SEG copies from ``source`` whose value is not valid for its VR, or
    None. highdicom re-parses these (dates, times, the sex code) and its errors quote the value."""
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DA, DT, TM, validate_value

    parsers = {"DA": DA, "DT": DT, "TM": TM}
    for keyword in SEG_COPIED:
        if keyword not in source:
            continue
        try:
            elem = source[keyword]
            values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            for v in values:
                if v is None or v == "":
                    continue
                validate_value(elem.VR, v, config.RAISE)
                if elem.VR in parsers:
                    parsers[elem.VR](v)
            if keyword == "PatientSex" and str(elem.value or "") not in PATIENT_SEX_VALUES:
                raise ValueError("not an enumerated value")
        except Exception:
            return keyword
    return None


def _with_type2_copied(source: Dataset) -> Dataset:
    """``source``, or a copy of it with the missing type-2 attributes the SEG copies present and
    empty, as the standard allows. The copy holds the same elements (pixel data is not copied) in
    a new dataset, so neither the caller's dataset nor the file on disk changes."""
    from pydicom.dataset import Dataset as PydicomDataset

    missing = [k for k in SEG_TYPE2_COPIED if k not in source]
    if not missing:
        return source
    copy = PydicomDataset()
    copy.update(source)
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    for keyword in missing:
        setattr(copy, keyword, None)
    return copy


def segmentation_bytes(source: Dataset, masks: list[np.ndarray], label: str = "curriculum-prompting") -> bytes:
    """A binary DICOM-SEG (one segment, one frame per source frame) for ``source``'s frames.

    Raises InputError, naming the element (never its value), when an attribute the SEG copies
    from ``source`` is invalid.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise MissingExtraError.for_feature("writing DICOM-SEG", EXTRA) from None
    _quiet_libraries()
    bad = _invalid_copied_element(source)
    if bad:
        raise InputError(
            f"no DICOM-SEG written: an invalid value in element {_element(bad)}, which the DICOM-SEG copies "
            "from its source; correct the value (or make it empty) in the source file and rerun"
        )
    source = _with_type2_copied(source)
    pixels = np.stack([np.asarray(m, bool) for m in masks]).astype(np.uint8)
    if len(masks) == 1 and int(source.get("NumberOfFrames", 1) or 1) == 1:
        pixels = pixels[0]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="curriculum-prompting", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=int(source.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="curriculum-prompting",
        manufacturer_model_name="cp-deploy",
        software_versions=__version__,
        device_serial_number="none",
        series_description="cp-deploy segmentation",
        # Every source frame gets a segmentation frame, so frame i of the SEG is frame i of the
        # source even where nothing was found.
        omit_empty_frames=False,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
