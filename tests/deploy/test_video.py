"""Video inputs: one record and mask per frame, a file record, and an overlay video of as many frames."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.errors import MissingExtraError
from cp_deploy.files import read_mask
from cp_deploy.formats import ReadOptions, discover_inputs, read_input
from tests.conftest import without_module

av = pytest.importorskip("av", reason="the 'video' extra (PyAV) is not installed")

N_FRAMES = 5


def _write_video(path: Path, n: int, size: tuple[int, int] = (96, 67), codec: str = "mpeg4") -> None:
    """``n`` frames of a bright disc moving over a dark background (odd height on purpose)."""
    w, h = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for i in range(n):
            img = np.full((stream.height, stream.width, 3), 40, np.uint8)
            cv2.circle(img, (20 + 8 * i, stream.height // 2), 14, (230, 200, 180), -1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def _records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_video_gives_a_record_and_mask_per_frame_and_an_overlay_video(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _write_video(inp / "clip.mp4", N_FRAMES)
    _write_video(inp / "scope.avi", 1)
    assert [p.as_posix() for p in discover_inputs(inp)] == ["clip.mp4", "scope.avi"]
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--no-progress"]) == 0
    recs = _records(out)
    frames = [f"clip.mp4#f{i:04d}" for i in range(1, N_FRAMES + 1)]
    assert sorted(k for k in recs if k.startswith("clip.mp4#")) == frames
    for i, key in enumerate(frames, 1):
        rec = recs[key]
        assert rec["status"] == "ok" and rec["source"] == "clip.mp4" and rec["frame"] == f"f{i:04d}"
        assert rec["mask"] == f"masks/clip_f{i:04d}.png"
        assert read_mask(out / rec["mask"]).shape == (68, 96)
    file_rec = recs["clip.mp4"]
    assert file_rec["frames"] == N_FRAMES and file_rec["format"] == "video" and file_rec["status"] == "ok"
    overlay = out / file_rec["outputs"]["overlay_video"]
    assert overlay == out / "masks/clip.overlay.mp4"
    assert _count_frames(overlay) == N_FRAMES
    # A one-frame video is one image with its overlay video.
    single = recs["scope.avi"]
    assert single["mask"] == "masks/scope.png" and _count_frames(out / single["outputs"]["overlay_video"]) == 1

    # --resume after losing a frame mask redoes that frame and rewrites the file's overlay video.
    (out / "masks/clip_f0003.png").unlink()
    overlay.unlink()
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--no-progress", "--resume"]) == 0
    assert (out / "masks/clip_f0003.png").is_file() and _count_frames(overlay) == N_FRAMES


def test_video_frames_over_max_pixels_are_refused_from_the_header(tmp_path):
    _write_video(tmp_path / "big.mov", 2, size=(96, 68))
    with pytest.raises(Exception, match="max-pixels"):
        read_input(tmp_path / "big.mov", ReadOptions(max_pixels=96 * 68 - 1))
    decoded = read_input(tmp_path / "big.mov", ReadOptions(max_pixels=96 * 68))
    assert len(decoded.frames) == 2 and decoded.labels == ["f0001", "f0002"]


def test_video_without_the_extra_names_it(tmp_path, monkeypatch):
    _write_video(tmp_path / "clip.mp4", 1)
    without_module(monkeypatch, "av")
    with pytest.raises(MissingExtraError, match="'video' extra"):
        read_input(tmp_path / "clip.mp4")
