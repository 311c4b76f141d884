"""What a run writes about its inputs: the ``results.jsonl`` records (an image, a frame, a file of
several frames, an error, an unreadable folder) and the ``run.json`` summary. Both executors build
them only here, so their journals are interchangeable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cp_deploy.pipeline import ImageResult


def result_record(key: str, mask_rel: str, result: ImageResult) -> dict:
    """The JSON line of one segmented image (coordinates in original pixels)."""
    instances = []
    for k in range(len(result.boxes)):
        inst = {
            "box": [round(float(v), 2) for v in result.boxes[k]],
            "score": round(float(result.scores[k]), 4),
            "iou_prediction": round(float(result.iou_predictions[k]), 4),
            "area": int(result.masks[k].sum()),
        }
        if result.points.shape[1]:
            inst["points"] = [[round(float(x), 2), round(float(y), 2)] for x, y in result.points[k]]
            inst["point_scores"] = [round(float(s), 4) for s in result.point_scores[k]]
        instances.append(inst)
    h, w = result.original_size
    return {
        "path": key,
        "status": "ok",
        "mask": f"masks/{mask_rel}",
        "width": w,
        "height": h,
        "mask_area": int(result.mask.sum()),
        "instances": instances,
        "timings_ms": dict(result.timings_ms),
    }


def error_record(key: str, error: str) -> dict:
    """An image, frame or file that could not be read or segmented."""
    return {"path": key, "status": "error", "error": error}


def folder_record(root: Path, rel: Path, why: str) -> dict:
    """A folder that could not be listed, so none of its images were segmented."""
    return {"path": rel.as_posix(), "status": "error", "folder": True,
            "error": f"{root / rel}: cannot list the folder ({why}), so its images were not segmented; make it "
                     "readable, then rerun with --resume"}


def with_frame(rec: dict, source: str, label: str) -> dict:
    """A frame's record names its file and label, so ``--resume`` keeps finished frames."""
    rec["source"], rec["frame"] = source, label
    return rec


def file_record(rel: str, frames: int, info: dict, single: dict | None, outputs: dict[str, str],
                error: str | None) -> dict:
    """The record of a file with a file-level output or several frames, once its frames are written.

    ``single`` is the record of a file's only frame, which the file's record extends (a failed
    file output makes it an error); a file of several frames gets its own record (``frames``)."""
    if single is None:
        rec = {"path": rel, "status": "error" if error else "ok", "frames": frames, **info}
    else:
        rec = {**single, **info}
        if error:
            rec["status"] = "error"
    if outputs:
        rec["outputs"] = {**rec.get("outputs", {}), **outputs}  # a single frame's own (instances) stay
    if error and "error" not in rec:
        rec["error"] = error
    return rec


@dataclass
class RunSummary:
    total: int
    ok: int
    failed: int
    skipped: int
    seconds: float
    output: Path

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def run_info(self, batch_size: int, settings: dict) -> dict:
        """``run.json``: counts and wall-clock throughput (known only here) for ``cp-deploy report``,
        and the settings that ``--resume`` must match."""
        return {"ok": self.ok, "failed": self.failed, "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 4), "batch_size": batch_size,
                "settings": settings}

    def line(self) -> str:
        return (
            f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) of {self.total} images "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); results: {self.output / 'results.jsonl'}"
        )
