"""What ``cp-deploy batch --input`` names: a folder, one file, a glob or a list of files."""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from cp_deploy.errors import InputError
from cp_deploy.formats import discover_inputs, is_input_file


@dataclass(frozen=True)
class Inputs:
    """The files (relative to ``root``, which records' paths are relative to), the folders that
    could not be listed (relative path -> why) and ``rescanned``: the folder a rerun lists again
    (a folder, or a glob's fixed part), which the output must not be in."""

    root: Path
    files: list[Path]
    unreadable: dict[Path, str]
    rescanned: Path | None


def list_inputs(spec: str | Path) -> Inputs:
    """A folder (searched recursively), one input file, a glob (``'data/**/*.png'``) or a text
    file listing inputs, one per line (``#`` comments; relative paths from the list's folder)."""
    path = Path(spec)
    if path.is_dir():
        unreadable: dict[Path, str] = {}
        return Inputs(path, discover_inputs(path, unreadable), unreadable, path)
    if path.is_file():
        return _listed([path] if is_input_file(path) else _read_list(path), None)
    if glob.has_magic(str(spec)):
        found = [Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file() and is_input_file(Path(p))]
        if not found:
            raise InputError(f"--input '{spec}': the pattern matches no image, DICOM or NIfTI file; check it "
                             "(and quote it, so that the shell does not expand it)")
        fixed = Path(*itertools.takewhile(lambda p: not glob.has_magic(p), path.parts))
        return _listed(found, fixed)
    raise InputError(f"input '{spec}' does not exist; pass --input with a folder, a file, a glob or a list of files")


def _read_list(path: Path) -> list[Path]:
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    files = [p if p.is_absolute() else path.parent / p for p in map(Path, filter(None, lines))]
    if not files:
        raise InputError(f"{path}: is neither an image, DICOM or NIfTI file nor a list of them; pass --input "
                         "with a folder, a file, a glob or a text file listing files")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(f"{path}: lists files that do not exist: {', '.join(missing[:3])}{more}; fix the list")
    return files


def _listed(files: list[Path], rescanned: Path | None) -> Inputs:
    """Files named one by one: each once, relative to their common folder."""
    absolute = sorted({p.resolve() for p in files})
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return Inputs(root, [p.relative_to(root) for p in absolute], {}, rescanned)
