"""Video in and overlay video out, through PyAV (FFmpeg's decoders and encoders; the ``video`` extra).

Every frame of the first video stream is one image (labels ``f0001``, ...), as the frames of a
multi-frame DICOM are. The file's own output is an overlay video: the source's frames with each
frame's final mask tinted and outlined, at the source's frame rate. The write-back decodes the
source again rather than keeping its frames, so holding it costs nothing until the last frame is in.

All frames of a file are decoded before they are segmented (a file's frames become work items
together), so a video holds frames x width x height x 3 bytes in memory: 2.7 GB for 1000 frames
of 1280x720. ``--max-pixels`` bounds each frame, from the stream's header, before decoding.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from cp_deploy.errors import InputError, MissingExtraError
from cp_deploy.files import check_pixel_budget
from cp_deploy.formats.base import Decoded, ReadOptions

EXTRA = "video"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov")
OVERLAY_SUFFIX = ".overlay.mp4"
# H.264 where the FFmpeg build has an encoder for it (PyAV's wheels do), else FFmpeg's own MPEG-4 part 2.
CODECS = ("libx264", "mpeg4")
FINAL = (0, 255, 0)  # the final contour's colour, as in the image overlays


def _import_av(path: Path):
    try:
        import av
    except ImportError as e:
        raise MissingExtraError.for_file(path, "video", EXTRA) from e
    return av


def is_video_path(path: Path | str) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _frames(av, path: Path) -> tuple[list[np.ndarray], Fraction]:
    """Every frame of the first video stream as HxWx3 RGB uint8, and its frame rate."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: the file has no video stream; nothing to segment")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], Fraction(rate)
    except av.FFmpegError as e:
        raise InputError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from e


def read_video(path: Path, options: ReadOptions) -> Decoded:
    """One frame per image and an overlay video as the file's output (see the module docstring)."""
    av = _import_av(path)
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if streams:
                check_pixel_budget(path, streams[0].width, streams[0].height, options.max_pixels, "frames")
    except av.FFmpegError as e:
        raise InputError(f"{path}: cannot open the video ({type(e).__name__}: {e})") from e
    frames, rate = _frames(av, path)
    if not frames:
        raise InputError(f"{path}: the video has no frames; nothing to segment")

    def write_back(masks: list[np.ndarray]) -> dict[str, tuple[str, bytes]]:
        source, _ = _frames(av, path)
        if len(source) != len(masks):
            raise InputError(f"{path}: the video now has {len(source)} frames, its masks {len(masks)}; "
                             "rerun without --resume")
        return {"overlay_video": (OVERLAY_SUFFIX, encode_overlay_video(av, source, masks, rate))}

    labels = [f"f{i + 1:04d}" for i in range(len(frames))] if len(frames) > 1 else []
    h, w = frames[0].shape[:2]
    info = {"format": "video", "fps": round(float(rate), 3), "width": w, "height": h}
    return Decoded(frames=frames, labels=labels, write_back=write_back, info=info)


def overlay_frame(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB frame with its mask tinted and its final contour drawn, as the image overlays show them."""
    canvas = frame.copy()
    canvas[mask] = (canvas[mask].astype(np.float32) * 0.7 + np.array(FINAL, np.float32) * 0.3).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, FINAL, max(1, round(max(canvas.shape[:2]) / 200)), lineType=cv2.LINE_AA)
    return canvas


def encode_overlay_video(av, frames: list[np.ndarray], masks: list[np.ndarray], rate: Fraction) -> bytes:
    """The overlay frames as an MP4 in memory (the one atomic writer writes it)."""
    h, w = frames[0].shape[:2]
    # 4:2:0 chroma needs even sides: the last row/column is repeated where one is odd.
    pad_h, pad_w = h % 2, w % 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        codec = next(c for c in CODECS if c in av.codecs_available)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        for frame, mask in zip(frames, masks):
            canvas = overlay_frame(frame, np.asarray(mask, bool))
            if pad_h or pad_w:
                canvas = cv2.copyMakeBorder(canvas, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
