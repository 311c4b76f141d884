"""DICOM in (pydicom) and DICOM-SEG out (highdicom).

Grayscale pixels go through the Modality LUT (rescale slope/intercept or a LUT), then the VOI
LUT or the first window (centre/width), mapped onto 0..255; MONOCHROME1 is inverted so that
bright means dense as in MONOCHROME2. Colour (RGB, YBR_*, PALETTE COLOR) becomes RGB. A
multi-frame file gives one frame per image. Names, IDs and dates never leave this module: the
metadata it returns holds UIDs only, and only when asked for.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cp_deploy.formats.base import EXTRA_HINT, Decoded, MissingExtraError, ReadOptions
from cp_deploy.io import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

EXTRA = "dicom"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _import_pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the pixel-data handlers live here
    except ImportError:
        return None
    return pydicom


def _check_decoder(path: Path, ds: Dataset) -> None:
    """Fail early, with the syntax and the fix, when no installed handler decodes the pixels."""
    from pydicom.pixels.decoders.base import get_decoder

    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None or not tsyntax.is_compressed:
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
        raise MissingExtraError(path, "DICOM files", EXTRA)
    try:
        ds = pydicom.dcmread(path, force=False)
    except Exception as e:  # pydicom's messages name the structure, never a patient's data
        raise InputError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise InputError(
            f"{path}: the DICOM file has no pixel data (modality {ds.get('Modality', '?')}, "
            "e.g. a report or a presentation state); nothing to segment"
        )
    _check_decoder(path, ds)
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "?")
        raise InputError(f"{path}: cannot decode the pixel data (transfer syntax {getattr(ts, 'name', ts)}): "
                         f"{type(e).__name__}: {e}") from e
    frames = _frames(ds, arr)
    info: dict = {"format": "dicom", "modality": str(ds.get("Modality", ""))}
    if options.include_uids:
        info["uids"] = {
            "study": str(ds.get("StudyInstanceUID", "")),
            "series": str(ds.get("SeriesInstanceUID", "")),
            "sop_instance": str(ds.get("SOPInstanceUID", "")),
        }

    def write_back(masks: list[np.ndarray]) -> dict[str, tuple[str, bytes]]:
        return {"dicom_seg": (".seg.dcm", segmentation_bytes(ds, masks))}

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


def segmentation_bytes(source: Dataset, masks: list[np.ndarray], label: str = "curriculum-prompting") -> bytes:
    """A binary DICOM-SEG (one segment, one frame per source frame) for ``source``'s frames."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise MissingExtraError("DICOM-SEG", "writing DICOM-SEG", EXTRA) from None
    from cp_deploy import __version__

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
