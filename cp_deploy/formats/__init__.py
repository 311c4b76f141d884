"""Medical image formats: readers give arrays plus what is needed to write results back.

``read_input`` dispatches on the file: DICOM (``.dcm``, ``.dicom`` or the ``DICM`` preamble),
NIfTI (``.nii``, ``.nii.gz``), video (``.mp4``, ``.avi``, ``.mov``), anything else to
:func:`cp_deploy.files.read_pages` (every page of a multi-page TIFF is a frame). Every reader
returns a :class:`Decoded`: one or more frames as stored (the pipeline's ``to_rgb_uint8`` does
the conversion, as for any image) and, for formats that have one, a write-back that turns the
frames' masks into the format's own output (DICOM-SEG, mask NIfTI, overlay video).
"""

from __future__ import annotations

from pathlib import Path

from cp_deploy.errors import MissingExtraError
from cp_deploy.files import IMAGE_EXTENSIONS, discover_images, read_pages
from cp_deploy.formats.base import (
    DICOM_EXTENSIONS,
    NIFTI_EXTENSIONS,
    Decoded,
    ReadOptions,
    is_dicom_file,
    is_nifti_path,
)
from cp_deploy.formats.dicom import read_dicom
from cp_deploy.formats.nifti import read_nifti
from cp_deploy.formats.video import VIDEO_EXTENSIONS, is_video_path, read_video

__all__ = ["Decoded", "MissingExtraError", "ReadOptions", "discover_inputs", "is_input_file", "read_input"]


def is_input_file(path: Path) -> bool:
    """An image, DICOM, NIfTI or video file that ``cp-deploy batch`` reads."""
    return (path.suffix.lower() in IMAGE_EXTENSIONS or is_nifti_path(path) or is_video_path(path)
            or is_dicom_file(path))


def discover_inputs(root: str | Path, unreadable: dict[Path, str] | None = None) -> list[Path]:
    """Every file under ``root`` that :func:`read_input` reads, as ``files.discover_images`` lists them."""
    kinds = ", ".join((*IMAGE_EXTENSIONS, *DICOM_EXTENSIONS, *NIFTI_EXTENSIONS, *VIDEO_EXTENSIONS))
    return discover_images(root, accept=is_input_file, unreadable=unreadable, looked_for=kinds)


def read_input(path: str | Path, options: ReadOptions | None = None) -> Decoded:
    """Decode one input file into its frames (see the module docstring)."""
    path = Path(path)
    options = options or ReadOptions()
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _read_pages(path, options)
    if is_nifti_path(path):
        return read_nifti(path, options)
    if is_video_path(path):
        return read_video(path, options)
    if is_dicom_file(path):
        return read_dicom(path, options)
    return _read_pages(path, options)


def _read_pages(path: Path, options: ReadOptions) -> Decoded:
    """A plain image, or one frame per page of a multi-page TIFF (labels ``f001``, ...)."""
    pages = read_pages(path, options.max_pixels)
    return Decoded(frames=pages, info={"format": "tiff", "pages": len(pages)} if len(pages) > 1 else {})
