"""What every format reader returns, and the cheap file-type checks used by input discovery."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cp_deploy.constants import MAX_PIXELS

DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


@dataclass
class ReadOptions:
    """Format settings a run passes down to the readers."""

    # NIfTI volumes: the voxel axis to slice along; None picks the one of lowest resolution.
    slice_axis: int | None = None
    # DICOM: put the study/series/instance UIDs into results.jsonl (never names, IDs or dates).
    include_uids: bool = False
    # Refuse a frame plane (H*W) above this many pixels from the header, before decoding; 0: no limit.
    max_pixels: int = MAX_PIXELS


@dataclass
class Decoded:
    """One input file, decoded.

    ``frames`` are HxW or HxWxC arrays as stored, ready for ``preprocess.to_rgb_uint8``;
    ``labels`` name them when there are several (``f001`` for DICOM frames, ``z012`` for NIfTI
    slices) and are empty for a single frame. ``write_back`` turns the frames' HxW bool masks, in
    order, into ``{kind: (file suffix, bytes)}``; ``info`` is safe metadata for results.jsonl.
    """

    frames: list[np.ndarray]
    labels: list[str] = field(default_factory=list)
    write_back: Callable[[list[np.ndarray]], dict[str, tuple[str, bytes]]] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = [""] if len(self.frames) == 1 else [f"f{i + 1:03d}" for i in range(len(self.frames))]
        if len(self.labels) != len(self.frames):
            raise ValueError("one label per frame")


def is_nifti_path(path: Path | str) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_EXTENSIONS)


def has_dicom_preamble(path: Path | str) -> bool:
    """True when the file carries DICOM Part 10's 128-byte preamble followed by ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_file(path: Path | str) -> bool:
    """A DICOM input: ``.dcm``/``.dicom``, or any other name whose bytes start as DICOM Part 10.

    PACS exports often name files by UID (``1.2.840....41``) or by number (``IM000001``), so
    the extension alone is not enough. ``DICOMDIR`` is the export's index, not an image.
    """
    p = Path(path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return True
    return p.name.upper() != "DICOMDIR" and has_dicom_preamble(p)
