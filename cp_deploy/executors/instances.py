"""Per-instance outputs of ``cp-deploy batch --coco`` and ``--save-logits``.

Each segmented image gets ``masks/<name>.instances.json`` (its instances as COCO annotations with
RLE segmentations, from ``pycocotools``: the optional ``coco`` extra) as the writer writes its
mask, so a killed run keeps them and ``--resume`` skips them like the mask. At the end of the run
:func:`write_coco` merges every finished image's file into ``OUT/instances.json``, one COCO
dataset (images, annotations, one category).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from cp_deploy.errors import MissingExtraError
from cp_deploy.files import atomic_write_bytes
from cp_deploy.pipeline import ImageResult

COCO_EXTRA = "coco"
COCO_FILE = "instances.json"
CATEGORY_ID = 1


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as e:
        raise MissingExtraError.for_feature("--coco (COCO RLE by pycocotools)", COCO_EXTRA) from e
    return mask_api


def check_coco() -> None:
    """Fail before any model loads when ``--coco`` cannot be served."""
    _mask_api()


def instances_json(key: str, result: ImageResult) -> bytes:
    """One image's instances: each final-pass mask as COCO RLE with its bbox (of the mask, xywh),
    area (pixels) and detector score."""
    mask_api = _mask_api()
    h, w = result.original_size
    annotations = []
    if len(result.masks):
        rles = mask_api.encode(np.asfortranarray(result.masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle, score in zip(rles, result.scores):
            annotations.append({
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "bbox": [round(float(v), 2) for v in mask_api.toBbox(rle)],
                "area": int(mask_api.area(rle)),
                "score": round(float(score), 4),
            })
    return json.dumps({"file_name": key, "width": w, "height": h, "annotations": annotations},
                      separators=(",", ":")).encode("utf-8")


def logits_npy(result: ImageResult) -> bytes:
    """The final pass's low-resolution logits (Kx1x256x256 float32 for SAM) as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(result.low_res_logits, dtype=np.float32))
    return buf.getvalue()


def write_coco(out: Path, records: dict[str, dict], category: str) -> Path:
    """``OUT/instances.json`` from the per-image files that the ok ``records`` (journal summaries)
    list under ``outputs.instances``, in path order; ids count from 1."""
    images, annotations = [], []
    for path in sorted(records):
        rel = records[path].get("outputs", {}).get("instances") if records[path].get("status") == "ok" else None
        if not rel:
            continue
        one = json.loads((out / rel).read_text(encoding="utf-8"))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": one["file_name"], "width": one["width"], "height": one["height"]})
        for ann in one["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_ID,
                                "iscrowd": 0, **ann})
    dataset = {"info": {"description": "cp-deploy batch --coco"}, "images": images, "annotations": annotations,
               "categories": [{"id": CATEGORY_ID, "name": category}]}
    path = out / COCO_FILE
    atomic_write_bytes(path, json.dumps(dataset, separators=(",", ":")).encode("utf-8"))
    return path
