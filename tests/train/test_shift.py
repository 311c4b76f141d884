"""The domain-shift check: seeded per image, the mask follows every geometric change, and
``cp-bench accuracy --shift`` scores the shifted images apart from the plain ones."""

from __future__ import annotations

import json

import numpy as np

from cp_bench.accuracy import shifted
from cp_bench.cli import main as bench_main
from cp_train.data import Sample, augment
from cp_train.shift import SHIFT_SUFFIX, domain_shift, shift_seed


def _sample(name: str = "a") -> Sample:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[40:80, 60:110] = True
    image[mask] = (250, 120, 90)  # a distinct "polyp" colour, to find where it went
    return Sample(name, image, mask)


def test_shift_is_seeded_by_name_and_keeps_the_polyp_under_its_mask():
    s = _sample()
    a = shifted([s])[0]
    b = shifted([s])[0]
    assert a.name == f"a{SHIFT_SUFFIX}0"
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.image.shape[:2] == a.mask.shape and a.image.dtype == np.uint8
    other = shifted([_sample("b")])[0].image  # another name, another shift
    assert other.shape != a.image.shape or not np.array_equal(other, a.image)
    # the polyp's area keeps its share of the picture's content up to resizing and the padded border
    hh, ww = a.mask.shape
    frac = a.mask.sum() / (hh * ww)
    assert 0.2 * s.mask.mean() < frac <= 1.05 * s.mask.mean()
    # under the mask the image is still redder than around it: the mask moved with the pixels
    r_in = a.image[a.mask][:, 0].astype(float) - a.image[a.mask][:, 2]
    r_out = a.image[~a.mask][:, 0].astype(float) - a.image[~a.mask][:, 2]
    assert r_in.mean() > r_out.mean() + 40


def test_shift_changes_the_look():
    s = _sample()
    img, mask = domain_shift(s.image, s.mask, np.random.default_rng(shift_seed("a")))
    assert img.shape != s.image.shape or np.abs(img.astype(int) - s.image).mean() > 5


def test_accuracy_shift_rows(tiny_bundle, dataset, tmp_path, capsys):
    out = tmp_path / "acc.json"
    cache = tmp_path / "cache"
    assert bench_main(["accuracy", "--bundle", str(tiny_bundle.root), "--data", str(dataset),
                       "--split", str(dataset / "train.txt"), "--cache-dir", str(cache),
                       "--rows", "2", "--shift", "--json", str(out)]) == 0
    assert "through the domain shift" in capsys.readouterr().out
    got = json.loads(out.read_text())
    assert got["shift"] is True and len(got["rows"]) == 1
    assert any(SHIFT_SUFFIX in p.name for p in cache.rglob("*.pt"))  # cached apart from the plain images


def test_detector_augmentation_applies_the_shift_when_asked():
    s = _sample()
    plain = [augment(s.image, s.mask, np.random.default_rng(i))[0].shape for i in range(8)]
    shifted_ = [augment(s.image, s.mask, np.random.default_rng(i), shift=1.0) for i in range(8)]
    assert all(img.shape[:2] == mask.shape and mask.any() for img, mask in shifted_)
    # the shift pads a border and changes the aspect ratio: sizes the plain augmentation never gives
    assert {img.shape for img, _ in shifted_} - set(plain)
