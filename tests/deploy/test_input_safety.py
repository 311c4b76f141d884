"""What reading an input can do wrong quietly: masks of another convention, the pages of a TIFF
after the first, and images that declare more pixels than memory holds."""

from __future__ import annotations

import json
import resource
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.errors import InputError
from cp_deploy.files import read_image, read_mask
from cp_deploy.formats import ReadOptions, read_input
from tests.conftest import make_images


def _disc(h: int = 60, w: int = 80, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (w // 2, h // 2), min(h, w) // 3, value, -1)
    return m


def _lines(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


# --- masks: one rule in read_mask, shared by eval, training and the executor -------------------


@pytest.mark.parametrize("ext,dtype,value", [(".png", np.uint8, 1), (".png", np.uint8, 255), (".png", np.uint16, 1),
                                             (".tif", np.uint16, 3), (".bmp", np.uint8, 7)])
def test_zero_and_one_value_masks_are_foreground(tmp_path, ext, dtype, value):
    disc = _disc() > 0
    cv2.imwrite(str(tmp_path / f"m{ext}"), disc.astype(dtype) * value)
    np.testing.assert_array_equal(read_mask(tmp_path / f"m{ext}"), disc)
    cv2.imwrite(str(tmp_path / f"full{ext}"), np.full((8, 9), value, dtype))
    assert read_mask(tmp_path / f"full{ext}").all()


@pytest.mark.parametrize("quality", [30, 75, 95])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossy_jpeg_masks_are_thresholded_at_half(tmp_path, quality, channels):
    disc = _disc(90, 120)
    img = disc if channels == 1 else cv2.merge([disc] * 3)
    cv2.imwrite(str(tmp_path / "m.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imread(str(tmp_path / "m.jpg"), cv2.IMREAD_UNCHANGED)
    assert len(np.unique(decoded)) > 2  # really lossy
    first = decoded if decoded.ndim == 2 else decoded[..., 2]  # BGR on disk: R is the first channel read
    np.testing.assert_array_equal(read_mask(tmp_path / "m.jpg"), first >= 128)


def test_colour_label_map_and_grey_images_are_refused(tmp_path):
    make_images(tmp_path, 1)  # an RGB photo-like image
    labels = _disc()
    labels[labels > 0] = 1
    labels[:10] = 2
    cv2.imwrite(str(tmp_path / "labels.png"), labels)
    cv2.imwrite(str(tmp_path / "grey.png"), np.tile(np.arange(256, dtype=np.uint8), (20, 1)))
    for name, what in [("img_000.png", "colour image"), ("labels.png", "label map"), ("grey.png", "grey image")]:
        with pytest.raises(InputError) as e:
            read_mask(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and what in str(e.value) and "\n" not in str(e.value)


def test_eval_scores_zero_one_masks_and_refuses_rgb_ground_truth(tmp_path, capsys):
    pred, gt01, rgb = tmp_path / "pred", tmp_path / "gt01", tmp_path / "rgb"
    make_images(rgb, 2)
    pred.mkdir()
    gt01.mkdir()
    for i, p in enumerate(sorted(rgb.iterdir())):
        disc = _disc(60 + i, 80) > 0
        cv2.imwrite(str(pred / p.name), disc.astype(np.uint8) * 255)
        cv2.imwrite(str(gt01 / p.name), disc.astype(np.uint8))  # the nnU-Net/MONAI convention
        cv2.imwrite(str(rgb / p.name), cv2.resize(cv2.imread(str(p)), (80, 60 + i)))
    assert main(["eval", "--pred", str(pred), "--gt", str(gt01), "--json", "--csv", str(tmp_path / "e.csv")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 2 and s["mDice"] == pytest.approx(1.0) and s["mIoU"] == pytest.approx(1.0)

    assert main(["eval", "--pred", str(pred), "--gt", str(rgb), "--csv", str(tmp_path / "e.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(rgb / "img_000.png") in err and "colour image" in err


# --- multi-page TIFF: every page is a frame ----------------------------------------------------


def test_every_tiff_page_is_a_frame(tmp_path):
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 65535, (40, 50), dtype=np.uint16) for _ in range(3)]
    assert cv2.imwritemulti(str(tmp_path / "stack.tiff"), pages)
    d = read_input(tmp_path / "stack.tiff")
    assert d.labels == ["f001", "f002", "f003"] and d.info == {"format": "tiff", "pages": 3}
    for got, want in zip(d.frames, pages):
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, want)

    rgb = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "one.tif"), rgb)
    one = read_input(tmp_path / "one.tif")
    assert one.labels == [""] and one.info == {} and one.write_back is None
    np.testing.assert_array_equal(one.frames[0], read_image(tmp_path / "one.tif"))
    np.testing.assert_array_equal(one.frames[0], rgb[..., ::-1])


def test_batch_segments_every_tiff_page_and_refuses_over_max_pixels(tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    imgs = [cv2.imread(str(p)) for p in make_images(tmp_path / "src", 3, sizes=((64, 64),))]
    inp.mkdir()
    assert cv2.imwritemulti(str(inp / "stack.tiff"), imgs)
    cv2.imwrite(str(inp / "single.tif"), imgs[0])
    cv2.imwrite(str(inp / "big.png"), cv2.resize(imgs[0], (200, 150)))
    rc = main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
               "--no-progress", "--max-pixels", "20000"])
    rec = _lines(out)
    assert rc == 1  # big.png failed, the run went on
    for k in (1, 2, 3):
        assert rec[f"stack.tiff#f{k:03d}"]["status"] == "ok"
        assert rec[f"stack.tiff#f{k:03d}"]["mask"] == f"masks/stack_f{k:03d}.png"
        assert (out / f"masks/stack_f{k:03d}.png").is_file()
    assert rec["stack.tiff"]["status"] == "ok" and rec["stack.tiff"]["frames"] == 3
    assert rec["single.tif"]["status"] == "ok" and rec["single.tif"]["mask"] == "masks/single.png"
    assert not any(k.startswith("single.tif#") for k in rec)
    err = rec["big.png"]["error"]
    assert rec["big.png"]["status"] == "error" and "big.png" in err and "200x150" in err and "--max-pixels" in err


# --- pixel budget: refused from the header, before decoding ------------------------------------


def png_bomb(width: int, height: int, rows: int = 100) -> bytes:
    """A valid greyscale PNG of zeros, ~0.9 MB for 30000x30000, built in milliseconds: after a full
    flush zlib forgets its history, so every further block of ``rows`` zero rows compresses to the
    same bytes and is repeated rather than compressed again."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    block = bytes((width + 1) * rows)  # each row: filter byte 0, then the pixels
    z = zlib.compressobj(9)
    first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    n = (width + 1) * height
    # An empty final block, then the Adler-32 of n zero bytes: (n mod 65521) << 16 | 1.
    idat = first + again * (height // rows - 1) + b"\x03\x00" + struct.pack(">I", (n % 65521) << 16 | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_bomb_builder_is_a_valid_png(tmp_path):
    (tmp_path / "small.png").write_bytes(png_bomb(300, 200))
    img = read_image(tmp_path / "small.png")
    assert img.shape == (200, 300) and not img.any()


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(30000, 30000))
    assert bomb.stat().st_size < 1_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        read_input(bomb)
    assert time.perf_counter() - t0 < 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # the image is 900 MB
    msg = str(e.value)
    assert str(bomb) in msg and "30000x30000" in msg and "--max-pixels" in msg and "100,000,000" in msg


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_max_pixels_applies_to_every_image_format(tmp_path, ext):
    path = tmp_path / f"a{ext}"
    cv2.imwrite(str(path), np.full((100, 120, 3), 90, np.uint8))
    with pytest.raises(InputError, match="120x100"):
        read_input(path, ReadOptions(max_pixels=10_000))
    assert read_input(path, ReadOptions(max_pixels=12_000)).frames[0].shape == (100, 120, 3)
    assert read_input(path, ReadOptions(max_pixels=0)).frames[0].shape == (100, 120, 3)


def test_max_pixels_applies_to_each_tiff_page(tmp_path):
    assert cv2.imwritemulti(str(tmp_path / "s.tiff"), [np.zeros((50, 50), np.uint8), np.zeros((100, 120), np.uint8)])
    with pytest.raises(InputError, match="page 2 of 120x100"):
        read_input(tmp_path / "s.tiff", ReadOptions(max_pixels=5000))


def test_max_pixels_applies_to_nifti_from_its_header(tmp_path):
    nib = pytest.importorskip("nibabel", reason="needs the 'nifti' extra")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 20000, 4))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    # The header and a few voxels: the 2.4 GB of data it declares are never read.
    (tmp_path / "v.nii").write_bytes(hdr.binaryblock + bytes(4) + bytes(1000))
    with pytest.raises(InputError) as e:
        read_input(tmp_path / "v.nii")
    assert "v.nii" in str(e.value) and "30000x20000" in str(e.value) and "--max-pixels" in str(e.value)


def test_ray_decoding_gives_a_row_per_page_and_applies_max_pixels(tmp_path):
    """The Ray executor's decode task: a multi-page TIFF becomes one row per page, the first
    carrying the file's work (never cut to its first page), and --max-pixels reaches it."""
    from cp_deploy.executors.core import FileWork
    from cp_deploy.executors.ray import decode_rows

    assert cv2.imwritemulti(str(tmp_path / "stack.tiff"), [np.zeros((40, 50), np.uint8)] * 3)
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((100, 100), np.uint8))
    rows = decode_rows({"path": "stack.tiff", "mask_rel": "stack.png", "done": '["stack.tiff#f002"]'},
                       str(tmp_path), ReadOptions())
    assert [(r["key"], r["mask_rel"]) for r in rows] == [("stack.tiff#f001", "stack_f001.png"),
                                                         ("stack.tiff#f003", "stack_f003.png")]
    assert all(r["image"] and not r["failed"] for r in rows) and rows[1]["file"] == ""
    work = FileWork.from_json(rows[0]["file"])
    assert work.keys() == ["stack.tiff#f001", "stack.tiff#f002", "stack.tiff#f003"]
    assert work.earlier == ["stack.tiff#f002"] and work.info == {"format": "tiff", "pages": 3}
    [row] = decode_rows({"path": "big.png", "mask_rel": "big.png", "done": "[]"}, str(tmp_path),
                        ReadOptions(max_pixels=5000))
    assert row["image"] == b"" and row["failed"] and "--max-pixels" in row["error"]
    [row] = decode_rows({"path": "big.png", "mask_rel": "big.png", "done": "[]"}, str(tmp_path), ReadOptions())
    assert row["image"] and row["file"] == "" and row["key"] == "big.png"