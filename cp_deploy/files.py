"""Input discovery, image decoding, atomic writes and the resumable run journal."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from cp_deploy.constants import MAX_PIXELS
from cp_deploy.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


_UMASK = os.umask(0)
os.umask(_UMASK)


def discover_images(root: str | Path, accept: Callable[[Path], bool] | None = None,
                    unreadable: dict[Path, str] | None = None, looked_for: str | None = None) -> list[Path]:
    """Files under ``root`` that ``accept`` takes (default: image extensions), recursively, as
    sorted paths relative to ``root``; ``looked_for`` describes them in the error when none is found.

    A subfolder that cannot be listed is never skipped silently: it goes into ``unreadable`` when
    given (path relative to ``root`` -> why), else an InputError.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"input folder '{root}' does not exist; pass --input DIR with your images")
    if not root.is_dir():
        raise InputError(f"--input '{root}' is a file; pass the folder that contains it")
    if accept is None:
        def accept(p: Path) -> bool:
            return p.suffix.lower() in IMAGE_EXTENSIONS

    failed: list[OSError] = []
    found = []
    for folder, _, names in os.walk(root, onerror=failed.append):
        found += [p.relative_to(root) for p in map(Path(folder).joinpath, names) if p.is_file() and accept(p)]
    found.sort()
    for e in failed:
        rel = Path(e.filename).relative_to(root)
        if unreadable is None or rel == Path("."):
            raise InputError(f"{e.filename}: cannot list the folder ({e.strerror}); make it readable, "
                             "or move it out of the input folder")
        unreadable[rel] = e.strerror
    if not found and not unreadable:
        raise InputError(
            f"no images found under '{root}' (looked for {looked_for or ', '.join(IMAGE_EXTENSIONS)} recursively); "
            "point --input at the folder that holds them"
        )
    return found


# Formats whose header Pillow reads without decoding a pixel (it opens files lazily).
_HEADER_PLUGINS = (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile, BmpImagePlugin.BmpImageFile,
                   TiffImagePlugin.TiffImageFile)


def check_pixel_budget(path: str | Path, width: int, height: int, max_pixels: int, what: str = "an image") -> None:
    """Refuse, before decoding, an image whose header declares more than ``max_pixels`` pixels
    (0: no limit): a small compressed file can declare gigabytes of pixels. ``what`` names the
    part of the file (``page 2``, ``frames``)."""
    if max_pixels and width * height > max_pixels:
        raise InputError(
            f"{path}: the header declares {what} of {width}x{height} = {width * height:,} pixels, over the "
            f"--max-pixels limit of {max_pixels:,}; if it is real, raise the limit with --max-pixels N (0: no limit)"
        )


def declared_sizes(data: bytes | np.ndarray) -> list[tuple[int, int]]:
    """(width, height) of every page of a TIFF, or of the one image of another file (an animated
    PNG's first frame, as cv2 reads it), as the header declares them, without decoding pixels;
    empty when Pillow does not recognise the header (cv2 decides then)."""
    head = bytes(data[:16])
    for plugin in _HEADER_PLUGINS:
        factory, accept = Image.OPEN[plugin.format]
        if accept(head):
            break
    else:
        return []
    try:
        # The plugin class, not Image.open: that raises its own decompression-bomb error above
        # 179 MP, which would hide the declared size and ignore --max-pixels.
        with factory(BytesIO(data)) as im:
            sizes = []
            for k in range(im.n_frames if plugin is TiffImagePlugin.TiffImageFile else 1):
                im.seek(k)
                sizes.append(im.size)
            return sizes
    except Exception:  # a header Pillow cannot parse: cv2 gives the error below
        return []


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file as stored: HxW or HxWxC (RGB/RGBA order), uint8 or uint16; of a
    multi-page TIFF the first page (:func:`read_pages` reads them all). A file whose header declares
    more than ``max_pixels`` pixels (0: no limit) is refused before it is decoded.

    Conversion to the model's RGB uint8 happens in ``preprocess.to_rgb_uint8``.
    """
    return read_pages(path, max_pixels, first_only=True)[0]


def read_pages(path: str | Path, max_pixels: int = MAX_PIXELS, first_only: bool = False) -> list[np.ndarray]:
    """Every page of an image file, each as :func:`read_image` gives it: one, except for a
    multi-page TIFF."""
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror}); check that it exists and is readable") from e
    sizes = declared_sizes(data)[: 1 if first_only else None]
    for k, (w, h) in enumerate(sizes):
        check_pixel_budget(path, w, h, max_pixels, f"page {k + 1}" if len(sizes) > 1 else "an image")
    if len(sizes) > 1:
        ok, pages = cv2.imdecodemulti(data, cv2.IMREAD_UNCHANGED)
        pages = list(pages) if ok else []
    else:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        pages = [] if image is None else [image]
    if not pages:
        raise InputError(
            f"{path}: cannot decode the image (empty, truncated or not a PNG/JPEG/BMP/TIFF file); "
            "re-export it or move it out of the input folder"
        )
    for k, image in enumerate(pages):
        if image.ndim == 3 and image.shape[2] == 3:
            pages[k] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.ndim == 3 and image.shape[2] == 4:
            pages[k] = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return pages


# A lossy (JPEG) mask's pixels lie near 0 or near full scale; a mid-range value (between a quarter
# and three quarters of the range) is rare, found only at edges (0.13% of pixels at JPEG quality 30).
_MID_RANGE_SHARE = 0.01
# Channels of a grey image stored as colour differ by a few levels of JPEG noise at most (by 0 in
# Kvasir-SEG's masks); more, on over 1% of the pixels, is a colour image.
_CHANNEL_SPREAD = 16


def read_mask(path: str | Path, threshold: int = 128) -> np.ndarray:
    """A binary mask file -> HxW bool, by one rule for every caller:

    * zero and one other value (0/1, 0/255, ...), or a single value: non-zero is foreground;
    * a near-binary lossy mask (JPEG: values near 0 and near full scale, at most 1% in between):
      thresholded at ``threshold`` of 255 (Kvasir-SEG's masks);
    * a colour image (channels that disagree), a label map of several classes, or a grey image
      (mid-range values): refused with an InputError naming the file and what it holds.
    """
    m = read_image(path)
    scale = "" if m.dtype == np.uint8 else ", scaled to 0-255"
    if m.dtype != np.uint8:  # 16-bit or float: scaled by its maximum (a 0/1 mask stays 0 and one value)
        m = np.clip(m.astype(np.float64) / max(float(m.max()), 1e-12) * 255, 0, 255).astype(np.uint8)
    if m.ndim == 3:
        ch = cv2.split(m)
        differ = (cv2.absdiff(ch[0], ch[1]) > _CHANNEL_SPREAD) | (cv2.absdiff(ch[0], ch[2]) > _CHANNEL_SPREAD)
        if np.mean(differ) > _MID_RANGE_SHARE:
            raise InputError(
                f"{path}: is a colour image ({m.shape[2]} channels that differ), not a mask; pass the "
                "binary mask files (0 = background, one non-zero value = foreground)"
            )
        m = ch[0]
    values = np.flatnonzero(np.bincount(m.ravel(), minlength=256))
    if len(values) == 1 or (len(values) == 2 and values[0] == 0):
        return m != 0
    low, high = m < 64, m >= 192
    mid = 1.0 - np.mean(low | high)
    if mid <= _MID_RANGE_SHARE and low.any() and high.any():
        return m >= threshold
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    what = (f"{100 * mid:.0f}% of its pixels mid-range: a grey image" if mid > _MID_RANGE_SHARE
            else "a label map of several classes")
    raise InputError(
        f"{path}: holds {len(values)} values ({shown}{scale}), {what}, not a binary mask; pass masks of "
        "0 (background) and one non-zero value (foreground), e.g. one class of a label map"
    )


# ``.NAME.cp-XXXXXXXX.tmp``: mkstemp's 8 random characters after a marker no user file carries,
# so cleaning up after a killed run can never match a user's own ``.something.tmp``.
_TEMP_PREFIX = ".cp-"
_TEMP_NAME = re.compile(r"\..+\.cp-[a-z0-9_]{8}\.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    An OSError names ``path`` (a failed write of the temporary file would name nothing)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TEMP_PREFIX}", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be shareable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def remove_stale_temporaries(out: str | Path) -> int:
    """Delete the temporary files killed :func:`atomic_write_bytes` calls left in the folders a
    run writes (``out`` itself, and ``out/masks`` and ``out/overlays`` recursively); their outputs
    were never journalled, so a resumed run writes them again. Returns how many were removed."""
    out = Path(out)
    candidates = [*out.glob(".*.tmp"), *(out / "masks").rglob(".*.tmp"), *(out / "overlays").rglob(".*.tmp")]
    stale = [p for p in candidates if _TEMP_NAME.fullmatch(p.name) and p.is_file()]
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
