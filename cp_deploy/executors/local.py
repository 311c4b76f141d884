"""Single-process executor: decode in worker threads, infer in batches, write in the background.

Images are decoded ahead of the model by a bounded thread pool; a background writer thread
writes masks and overlays atomically and only then records the image in the run journal, so a
killed run never records an image whose outputs are missing.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cp_deploy.io import RunJournal, atomic_write_bytes, discover_images, encode_image, read_image, write_mask
from cp_deploy.pipeline import CurriculumPipeline, ImageResult
from cp_deploy.preprocess import to_rgb_uint8


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

    def line(self) -> str:
        return (
            f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) of {self.total} images "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); results: {self.output / 'results.jsonl'}"
        )


def output_names(files: list[Path]) -> dict[str, str]:
    """Relative input path -> relative mask path: the same path with ``.png``; where two inputs
    share a stem (``a.jpg`` and ``a.png``), the full file name plus ``.png``, so none collide."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.with_suffix("").as_posix()] = stems.get(f.with_suffix("").as_posix(), 0) + 1
    out = {}
    for f in files:
        stem = f.with_suffix("").as_posix()
        out[f.as_posix()] = (stem if stems[stem] == 1 else f.as_posix()) + ".png"
    return out


def decode_timed(path: Path) -> tuple[np.ndarray | Exception, float]:
    t0 = time.perf_counter()
    try:
        return read_image(path), (time.perf_counter() - t0) * 1000
    except Exception as e:  # recorded per image; the run goes on
        return e, (time.perf_counter() - t0) * 1000


def _prefetch(pool: ThreadPoolExecutor, root: Path, files: list[Path], depth: int) -> Iterator:
    """Decode ``files`` in ``pool`` keeping at most ``depth`` in flight, yielding in order."""
    pending: deque = deque()
    it = iter(files)
    for f in it:
        pending.append((f, pool.submit(decode_timed, root / f)))
        if len(pending) >= depth:
            break
    while pending:
        f, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(decode_timed, root / nxt)))
        yield f, *fut.result()


def result_record(rel: str, mask_rel: str, result: ImageResult) -> dict:
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
        "path": rel,
        "status": "ok",
        "mask": f"masks/{mask_rel}",
        "width": w,
        "height": h,
        "mask_area": int(result.mask.sum()),
        "instances": instances,
        "timings_ms": dict(result.timings_ms),
    }


def write_outputs(out: Path, rel: str, mask_rel: str, image: np.ndarray | None, result: ImageResult | str,
                  decode_ms: float, overlays: bool) -> dict:
    """Write one image's mask (and overlay) atomically and return its record; ``result`` is the
    error message of an image that failed. Every executor writes through here, so their outputs agree."""
    if not isinstance(result, ImageResult):
        return {"path": rel, "status": "error", "error": result}
    t0 = time.perf_counter()
    rec = result_record(rel, mask_rel, result)
    write_mask(out / rec["mask"], result.mask)
    if overlays:
        from cp_deploy.visualize import draw_overlay

        ov_rel = f"overlays/{Path(mask_rel).with_suffix('.jpg').as_posix()}"
        atomic_write_bytes(out / ov_rel, encode_image(draw_overlay(to_rgb_uint8(image), result), ".jpg"))
        rec["overlay"] = ov_rel
    rec["timings_ms"]["decode"] = round(decode_ms, 3)
    rec["timings_ms"]["write"] = round((time.perf_counter() - t0) * 1000, 3)
    return rec


def segment_batch(pipeline: CurriculumPipeline, images: list[np.ndarray], labels: list[str]) -> list[ImageResult | str]:
    """``pipeline.predict`` on a batch; an image that breaks it gets an error message naming it
    (``labels[i]``) and the others are still segmented."""
    try:
        return list(pipeline.predict(images))
    except Exception as e:
        if len(images) == 1:
            return [f"{labels[0]}: segmentation failed: {e!r}"]
    # Isolate the image that breaks the batch instead of failing all of them.
    return [segment_batch(pipeline, [im], [lab])[0] for im, lab in zip(images, labels)]


class _Writer(threading.Thread):
    """Background writer: masks and overlays atomically, then the journal record."""

    def __init__(self, out: Path, journal: RunJournal, overlays: bool) -> None:
        super().__init__(daemon=True, name="cp-writer")
        self.out, self.journal, self.overlays = out, journal, overlays
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:  # surfaced to the main thread
                self.error = e

    def _write(self, rel: str, mask_rel: str, image: np.ndarray | None, result: ImageResult | str,
               decode_ms: float) -> None:
        self.journal.append([write_outputs(self.out, rel, mask_rel, image, result, decode_ms, self.overlays)])

    def put(self, *item) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing outputs failed: {self.error}") from self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise RuntimeError(f"writing outputs failed: {self.error}") from self.error


def plan_run(root: Path, out: Path, resume: bool) -> tuple[list[Path], dict[str, str], RunJournal, list[Path]]:
    """Every input, its mask name, the run journal (earlier records loaded on ``resume``, else
    cleared) and the inputs still to do."""
    files = discover_images(root)
    journal = RunJournal(out)
    if resume:
        journal.load()
    else:
        journal.reset()
    done = journal.done()
    return files, output_names(files), journal, [f for f in files if f.as_posix() not in done]


def run_folder(
    pipeline: CurriculumPipeline,
    input_dir: str | Path,
    output_dir: str | Path,
    batch_size: int = 1,
    overlays: bool = False,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir``; see the module docstring."""
    t_start = time.perf_counter()
    root, out = Path(input_dir), Path(output_dir)
    files, names, journal, todo = plan_run(root, out, resume)
    skipped = len(files) - len(todo)
    writer = _Writer(out, journal, overlays)
    writer.start()
    ok = failed = 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy")

    def flush(batch: list) -> None:
        nonlocal ok, failed
        if not batch:
            return
        results = segment_batch(pipeline, [im for _, im, _ in batch], [str(root / f) for f, _, _ in batch])
        for (f, im, dms), res in zip(batch, results):
            writer.put(f.as_posix(), names[f.as_posix()], im, res, dms)
            if isinstance(res, ImageResult):
                ok += 1
            else:
                failed += 1
        bar.update(len(batch))

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cp-decode") as pool:
            batch: list = []
            for f, image, decode_ms in _prefetch(pool, root, todo, depth=max(2 * batch_size, 2 * workers)):
                if isinstance(image, Exception):
                    writer.put(f.as_posix(), names[f.as_posix()], None, str(image), decode_ms)
                    failed += 1
                    bar.update(1)
                    bar.set_postfix(failed=failed)
                    continue
                batch.append((f, image, decode_ms))
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
            flush(batch)
    finally:
        bar.close()
        writer.close()
        journal.finalize()
    return RunSummary(len(files), ok, failed, skipped, time.perf_counter() - t_start, out)
