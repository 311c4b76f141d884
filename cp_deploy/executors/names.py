"""Where a run puts each input's outputs, and the journal key of each frame: the one naming rule
of both executors, so their folders (and ``--resume`` across them) agree."""

from __future__ import annotations

import re
from pathlib import Path

# Files that may hold several frames (DICOM, NIfTI, multi-page TIFF) have frame masks
# ``<stem>_<label>.png``, labels such as f001 (frames, pages) or x/y/z012 (NIfTI slices).
_FRAME_MASK = re.compile(r"(.+)_[fpxyz]\d+")
_SINGLE_FRAME = (".png", ".jpg", ".jpeg", ".bmp")


def _stem(f: Path) -> str:
    name = f.name
    cut = len(".nii.gz") if name.lower().endswith(".nii.gz") else len(f.suffix)
    return f.as_posix()[: len(f.as_posix()) - cut] if cut else f.as_posix()


def output_names(files: list[Path]) -> dict[str, str]:
    """Relative input path -> relative mask path: the same path with ``.png``. An input keeps its
    full file name plus ``.png`` where its stem is another input's (``a.jpg`` and ``a.png``) or
    looks like a frame mask of a multi-frame input (``cine_f001.png`` beside ``cine.dcm``)."""
    stems: dict[str, int] = {}
    for f in files:
        stems[_stem(f)] = stems.get(_stem(f), 0) + 1
    multi = {_stem(f) for f in files if f.suffix.lower() not in _SINGLE_FRAME}

    def clashes(f: Path) -> bool:
        frame = _FRAME_MASK.fullmatch(_stem(f))
        return stems[_stem(f)] > 1 or (frame is not None and frame.group(1) in multi)

    return {f.as_posix(): (f.as_posix() if clashes(f) else _stem(f)) + ".png" for f in files}


def frame_key(rel: str, label: str) -> str:
    """The journal key of a frame: the file's path, then ``#label`` when the file has several."""
    return rel if not label else f"{rel}#{label}"


def frame_mask_rel(mask_rel: str, label: str) -> str:
    """A frame's mask beside the file's: ``<stem>_<label>.png``."""
    return mask_rel if not label else f"{mask_rel[:-4]}_{label}.png"


def file_output_rel(mask_rel: str, suffix: str) -> str:
    """A file-level output (DICOM-SEG, mask NIfTI) beside the file's mask, under ``masks/``."""
    return f"masks/{mask_rel[:-4]}{suffix}"


def overlay_rel(mask_rel: str) -> str:
    return f"overlays/{Path(mask_rel).with_suffix('.jpg').as_posix()}"
