"""Input discovery, image decoding, atomic writes and the resumable run journal."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESULTS_FILE = "results.jsonl"
JOURNAL_FILE = "results.jsonl.partial"


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(RuntimeError):
    """The input folder or an input file cannot be used; the message names it and the fix."""


def discover_images(root: str | Path, medical: bool = False) -> list[Path]:
    """Image files under ``root``, recursively, as sorted paths relative to ``root``.

    With ``medical``, DICOM and NIfTI files count too (see ``cp_deploy.formats``), as
    ``cp-deploy batch`` reads them.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"input folder '{root}' does not exist; pass --input DIR with your images")
    if not root.is_dir():
        raise InputError(f"--input '{root}' is a file; pass the folder that contains it")
    if medical:
        from cp_deploy.formats import is_input_file as accept
    else:
        def accept(p: Path) -> bool:
            return p.suffix.lower() in IMAGE_EXTENSIONS

    found = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and accept(p))
    if not found:
        looked = ", ".join(IMAGE_EXTENSIONS + ((".dcm", ".dicom", ".nii", ".nii.gz") if medical else ()))
        raise InputError(
            f"no images found under '{root}' (looked for {looked} recursively); "
            "point --input at the folder that holds them"
        )
    return found


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file as stored: HxW or HxWxC (RGB/RGBA order), uint8 or uint16.

    Conversion to the model's RGB uint8 happens in ``preprocess.to_rgb_uint8``.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror}); check that it exists and is readable") from e
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(
            f"{path}: cannot decode the image (empty, truncated or not a PNG/JPEG/BMP/TIFF file); "
            "re-export it or move it out of the input folder"
        )
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def read_mask(path: str | Path, threshold: int = 128) -> np.ndarray:
    """A binary mask file (PNG or lossy JPEG) -> HxW bool, thresholded on its first channel."""
    m = read_image(path)
    if m.ndim == 3:
        m = m[..., 0]
    if m.dtype != np.uint8:
        m = (m.astype(np.float64) / max(float(m.max()), 1.0) * 255).astype(np.uint8)
    return m >= threshold


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be shareable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files a killed :func:`atomic_write_bytes` left under ``folder``
    (``.NAME.XXXX.tmp``); their outputs were never journalled, so a resumed run writes them again.
    Returns how many were removed."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def encode_image(image: np.ndarray, ext: str, quality: int = 90) -> bytes:
    """RGB or single-channel uint8 -> encoded bytes for ``ext`` ('.png' or '.jpg')."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise RuntimeError(f"could not encode an image as {ext}")
    return buf.tobytes()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    atomic_write_bytes(path, encode_image(mask.astype(np.uint8) * 255, ".png"))


class RunJournal:
    """Per-image records of one output folder, safe against a killed process.

    Records are appended to ``results.jsonl.partial`` and fsynced as images finish; a torn last
    line (the process died mid-write) is ignored on reading. ``finalize`` merges everything into
    ``results.jsonl`` (one line per image, sorted by path) with an atomic rename. An image counts
    as done when its record says ``ok`` and its mask file exists, so ``--resume`` redoes failed
    images and anything whose outputs were lost.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.results = self.out_dir / RESULTS_FILE
        self.journal = self.out_dir / JOURNAL_FILE
        self.records: dict[str, dict] = {}
        self._fh = None

    @staticmethod
    def _read(path: Path) -> Iterable[dict]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
        return out

    def load(self) -> None:
        """Read earlier records (final file first, then the newer journal)."""
        for rec in [*self._read(self.results), *self._read(self.journal)]:
            self.records[rec["path"]] = rec

    def done(self) -> set[str]:
        """Paths whose record is ``ok`` and whose every output file (mask, and any format
        outputs such as a DICOM-SEG) is still there."""
        return {p for p, r in self.records.items() if r.get("status") == "ok" and self.outputs_exist(r)}

    def outputs_exist(self, record: dict) -> bool:
        """A multi-frame file's own record may list no files (no format output for it)."""
        files = ([record["mask"]] if "mask" in record else []) + list(record.get("outputs", {}).values())
        return (bool(files) or "frames" in record) and all((self.out_dir / f).is_file() for f in files)

    def reset(self) -> None:
        """Start afresh: forget records and remove the old journal and results."""
        self.records.clear()
        for p in (self.journal, self.results):
            p.unlink(missing_ok=True)

    def append(self, records: list[dict]) -> None:
        if self._fh is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 - closed in finalize
        for rec in records:
            self.records[rec["path"]] = rec
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self) -> None:
        self.close()
        lines = "".join(json.dumps(self.records[p], separators=(",", ":")) + "\n" for p in sorted(self.records))
        atomic_write_bytes(self.results, lines.encode("utf-8"))
        self.journal.unlink(missing_ok=True)
