"""``cp-deploy batch --coco`` and ``--save-logits``: per-instance outputs that decode to the PNG masks;
results of the Python API that save and draw themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.errors import MissingExtraError
from cp_deploy.executors.local import run_folder
from cp_deploy.files import read_image, read_mask
from cp_deploy.pipeline import CurriculumPipeline
from cp_deploy.preprocess import to_rgb_uint8
from cp_deploy.visualize import draw_overlay
from tests.conftest import make_images, without_module


def _records(out):
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_coco_json_decodes_to_the_png_masks(tiny_bundle, tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco", reason="the 'coco' extra (pycocotools) is not installed")
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp / "sub", 4)
    args = ["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root), "--no-progress",
            "--coco", "--save-logits"]
    assert main(args) == 0
    coco = coco_api.COCO(str(out / "instances.json"))
    recs = _records(out)
    assert sorted(img["file_name"] for img in coco.dataset["images"]) == sorted(recs)
    assert coco.loadCats(coco.getCatIds())[0]["name"] == tiny_bundle.prompt.text
    with_instances = 0
    for img in coco.dataset["images"]:
        rec = recs[img["file_name"]]
        png = read_mask(out / rec["mask"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(rec["instances"])
        union = np.zeros(png.shape, bool)
        for ann in anns:
            m = coco.annToMask(ann).astype(bool)
            assert ann["area"] == int(m.sum()) and 0 <= ann["score"] <= 1
            x, y, w, h = ann["bbox"]
            if m.any():
                ys, xs = np.nonzero(m)
                assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            union |= m
        assert np.array_equal(union, png), img["file_name"]
        with_instances += bool(anns)
        logits = np.load(out / rec["outputs"]["logits"])
        assert logits.dtype == np.float32 and logits.shape[0] == len(anns) and logits.shape[1] == 1
    assert with_instances, "the tiny bundle found nothing: the test checks no decoding"

    # A killed run's finished images keep their instance files; --resume merges them all again.
    first = next(iter(sorted(recs)))
    (out / recs[first]["outputs"]["instances"]).unlink()
    (out / "instances.json").unlink()
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "instances.json").read_text())
    assert sorted(img["file_name"] for img in again["images"]) == sorted(recs)
    assert len(again["annotations"]) == len(coco.dataset["annotations"])


def test_coco_without_the_extra_fails_before_any_model(tiny_bundle, tmp_path, monkeypatch):
    without_module(monkeypatch, "pycocotools")
    make_images(tmp_path / "in", 1)
    with pytest.raises(MissingExtraError, match="'coco' extra"):
        run_folder(lambda: pytest.fail("models loaded"), tmp_path / "in", tmp_path / "out", coco=True)


def test_image_result_saves_and_draws_itself(tiny_bundle, tmp_path):
    """The Python API's results: ``save`` writes the mask as ``batch`` does, ``overlay`` draws what
    ``batch --overlays`` draws."""
    (path,) = make_images(tmp_path / "in", 1)
    image = read_image(path)
    result = CurriculumPipeline.from_bundle(str(tiny_bundle.root)).predict([image])[0]
    saved = result.save(tmp_path / "api" / "mask.png")
    assert np.array_equal(read_mask(saved), result.mask)
    assert not list((tmp_path / "api").glob(".*.tmp"))
    assert np.array_equal(result.overlay(image), draw_overlay(to_rgb_uint8(image), result))
    assert result.overlay(image).shape == (*result.original_size, 3)
    with pytest.raises(ValueError, match="the image it was predicted on"):
        result.overlay(image[:10])
    # The same bytes as the run's own mask of this image.
    out = tmp_path / "out"
    run_folder(CurriculumPipeline.from_bundle(str(tiny_bundle.root)), tmp_path / "in", out, progress=False)
    assert (out / "masks" / "img_000.png").read_bytes() == saved.read_bytes()
