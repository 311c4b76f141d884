"""Single-process executor: decode in worker threads, infer in batches, write in the background.

Images are decoded ahead of the model by a bounded thread pool; a background writer thread
writes masks and overlays atomically and only then records the image in the run journal, so a
killed run never records an image whose outputs are missing.

A file may hold several images (a multi-frame DICOM, a NIfTI volume): each frame is journalled
under ``path#label`` as it finishes, and once the file's last frame is written the writer builds
the file's own output (DICOM-SEG, mask NIfTI) and journals the file under its path. ``--resume``
skips finished files without decoding them, and in a half-done file only the missing frames.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cp_deploy.bundle import load_bundle
from cp_deploy.executors import PipelineFactory, pipeline_settings
from cp_deploy.executors.output import WriteFailed, claim_output, write_run_info
from cp_deploy.formats import Decoded, ReadOptions, read_input
from cp_deploy.io import (
    InputError,
    RunJournal,
    atomic_write_bytes,
    discover_images,
    encode_image,
    read_mask,
    remove_stale_temporaries,
    write_mask,
)
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


def _stem(f: Path) -> str:
    name = f.name
    cut = len(".nii.gz") if name.lower().endswith(".nii.gz") else len(f.suffix)
    return f.as_posix()[: len(f.as_posix()) - cut] if cut else f.as_posix()


# Files that may hold several frames (DICOM, NIfTI, multi-page TIFF) have frame masks
# ``<stem>_<label>.png``, labels such as f001 (frames, pages) or x/y/z012 (NIfTI slices).
_FRAME_MASK = re.compile(r"(.+)_[fpxyz]\d+")
_SINGLE_FRAME = (".png", ".jpg", ".jpeg", ".bmp")


def output_names(files: list[Path]) -> dict[str, str]:
    """Relative input path -> relative mask path: the same path with ``.png``. An input keeps its
    full file name plus ``.png`` where its stem is another input's (``a.jpg`` and ``a.png``) or
    looks like a frame mask of a multi-frame input (``cine_f001.png`` beside ``cine.dcm``)."""
    stems: dict[str, int] = {}
    for f in files:
        stems[_stem(f)] = stems.get(_stem(f), 0) + 1
    multi = {_stem(f) for f in files if f.suffix.lower() not in _SINGLE_FRAME}

    def clashes(f: Path) -> bool:
        frame = _FRAME_MASK.fullmatch(_stem(f))
        return stems[_stem(f)] > 1 or (frame is not None and frame.group(1) in multi)

    return {f.as_posix(): (f.as_posix() if clashes(f) else _stem(f)) + ".png" for f in files}


def decode_timed(path: Path, options: ReadOptions | None = None) -> tuple[Decoded | Exception, float]:
    t0 = time.perf_counter()
    try:
        return read_input(path, options), (time.perf_counter() - t0) * 1000
    except Exception as e:  # recorded per image; the run goes on
        return e, (time.perf_counter() - t0) * 1000


def _prefetch(pool: ThreadPoolExecutor, root: Path, files: list[Path], depth: int, options: ReadOptions) -> Iterator:
    """Decode ``files`` in ``pool`` keeping at most ``depth`` in flight, yielding in order."""
    pending: deque = deque()
    it = iter(files)
    for f in it:
        pending.append((f, pool.submit(decode_timed, root / f, options)))
        if len(pending) >= depth:
            break
    while pending:
        f, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(decode_timed, root / nxt, options)))
        yield f, *fut.result()


@dataclass
class _Source:
    """One input file that has several frames or a format output, while its frames are written."""

    rel: str
    decoded: Decoded
    mask_rel: str  # the single frame's mask; frames get ``<stem>_<label>.png`` beside it
    earlier: dict[str, dict]  # key -> ok record from an earlier run (--resume)
    records: dict[str, dict] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    remaining: int = 0

    @property
    def multi(self) -> bool:
        return len(self.decoded.frames) > 1

    def keys(self) -> list[str]:
        return [self.rel if not lab else f"{self.rel}#{lab}" for lab in self.decoded.labels]

    def frame_mask_rel(self, label: str) -> str:
        return self.mask_rel if not label else f"{self.mask_rel[:-4]}_{label}.png"


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

        # Images the main thread counted ok whose record the writer made an error: a format
        # output that failed, or a mask path another input wrote earlier in this run.
        self.demoted = 0
        self.file_failures = 0  # multi-frame files whose format output failed
        self.mask_owner: dict[str, str] = {}  # mask path -> the key that wrote it in this run

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:  # surfaced to the main thread
                self.error = e

    def _write(self, rel: str | None, mask_rel: str, image: np.ndarray | None, result: ImageResult | str | None,
               error: str | None, decode_ms: float, source: _Source | None = None) -> None:
        if rel is None:  # every frame of ``source`` was done in an earlier run
            self._finish(source)
            return
        ok = isinstance(result, ImageResult)
        owner = self.mask_owner.setdefault(mask_rel, rel) if ok else rel
        if owner != rel:  # never overwrite another input's mask; output_names should prevent this
            ok, error, result = False, (f"{rel}: its mask masks/{mask_rel} was already written for {owner} in "
                                        "this run; rename one of the two inputs"), None
            self.demoted += 1
        rec = write_outputs(self.out, rel, mask_rel, image, result if ok else (error or str(result)), decode_ms,
                            self.overlays)
        if source is None:
            self.journal.append([rec])
        else:
            self._frame_done(source, rel, rec, result.mask if ok else None)

    def _frame_done(self, source: _Source, key: str, rec: dict, mask: np.ndarray | None) -> None:
        if source.multi:
            rec["source"], rec["frame"] = source.rel, key[len(source.rel) + 1:]
            self.journal.append([rec])  # journalled now, so --resume keeps finished frames
        source.records[key] = rec
        if mask is not None:
            source.masks[key] = mask
        source.remaining -= 1
        if source.remaining == 0:
            self._finish(source)

    def _finish(self, source: _Source) -> None:
        """All frames of ``source`` are written: build its format outputs and journal the file."""
        keys = source.keys()
        records = {**source.earlier, **source.records}
        failed = [k for k in keys if records.get(k, {}).get("status") != "ok"]
        outputs: dict[str, str] = {}
        error = None
        if failed:
            error = f"{len(failed)} of {len(keys)} frames failed, so the file's own outputs were not written"
        elif source.decoded.write_back is not None:
            try:
                masks = [source.masks[k] if k in source.masks else read_mask(self.out / records[k]["mask"])
                         for k in keys]
                for kind, (suffix, data) in source.decoded.write_back(masks).items():
                    out_rel = f"masks/{source.mask_rel[:-4]}{suffix}"
                    atomic_write_bytes(self.out / out_rel, data)
                    outputs[kind] = out_rel
            except Exception as e:  # the masks are kept; the file is recorded as failed
                # An InputError already names the file and the fix; anything else is unexpected.
                error = str(e) if isinstance(e, InputError) else (
                    f"{source.rel}: writing the {source.decoded.info.get('format', 'format')} output failed: {e!r}")
        if source.multi:
            rec = {"path": source.rel, "status": "error" if error else "ok", "frames": len(keys),
                   **source.decoded.info}
            if error and not failed:
                self.file_failures += 1
        else:
            rec = {**records[source.rel], **source.decoded.info}
            if error and rec["status"] == "ok":
                rec["status"] = "error"
                self.demoted += 1
        if outputs:
            rec["outputs"] = outputs
        if error and "error" not in rec:
            rec["error"] = error
        self.journal.append([rec])

    def put(self, *item) -> None:
        if self.error is not None:
            raise WriteFailed.of(self.error) from self.error
        self.q.put(item)

    def close(self) -> None:
        """Write what is queued and stop; the caller checks ``error``."""
        self.q.put(None)
        self.join()


def plan_run(root: Path, out: Path, files: list[Path], unreadable: dict[Path, str], settings: dict,
             resume: bool) -> tuple[dict[str, str], RunJournal, list[Path]]:
    """Start a run in a claimed output folder (:func:`claim_output`): its mask names, the journal
    (earlier records loaded on ``resume``, else cleared, then an error record per ``unreadable``
    folder) and the inputs still to do. ``run.json`` records ``settings`` before the first image."""
    remove_stale_temporaries(out)  # half-written outputs of a killed run
    journal = RunJournal(out)
    if resume:
        journal.load()
        for key in [k for k, r in journal.records.items() if r.get("folder")]:
            del journal.records[key]  # listed afresh below, or readable now
    else:
        journal.reset()
    write_run_info(out, {"settings": settings})
    if unreadable:
        journal.append([{"path": rel.as_posix(), "status": "error", "folder": True,
                         "error": f"{root / rel}: cannot list the folder ({why}), so its images were not "
                                  "segmented; make it readable, then rerun with --resume"}
                        for rel, why in sorted(unreadable.items())])
    done = journal.done()
    return output_names(files), journal, [f for f in files if f.as_posix() not in done]


def list_inputs(root: Path, medical: bool) -> tuple[list[Path], dict[Path, str]]:
    """The inputs under ``root`` and the folders that could not be listed (relative path -> why)."""
    unreadable: dict[Path, str] = {}
    return discover_images(root, medical=medical, unreadable=unreadable), unreadable


def run_folder(
    pipeline: CurriculumPipeline | PipelineFactory,
    input_dir: str | Path,
    output_dir: str | Path,
    batch_size: int = 1,
    overlays: bool = False,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
    read_options: ReadOptions | None = None,
    overwrite: bool = False,
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir``; see the module docstring.

    ``read_options`` carries the DICOM/NIfTI settings (slice axis, UIDs in the records). Given a
    :class:`PipelineFactory`, the output folder is checked (:func:`claim_output`) before the
    models load; ``overwrite`` lets a non-empty one be replaced, ``resume`` continues its run.
    """
    t_start = time.perf_counter()
    root, out = Path(input_dir), Path(output_dir)
    read_options = read_options or ReadOptions()
    if isinstance(pipeline, PipelineFactory):
        bundle = load_bundle(pipeline.bundle)  # checked, not built: the networks load after the checks
        settings = pipeline.settings(read_options.slice_axis, bundle)
    else:
        settings = pipeline_settings(pipeline, read_options.slice_axis)
    files, unreadable = list_inputs(root, medical=True)
    with claim_output(root, out, settings, resume=resume, overwrite=overwrite):
        if isinstance(pipeline, PipelineFactory):
            pipeline = pipeline(bundle)
        try:
            return _segment(pipeline, root, out, files, unreadable, settings, resume, batch_size=batch_size,
                            overlays=overlays, workers=workers, progress=progress, read_options=read_options,
                            t_start=t_start)
        except OSError as e:  # a full disk or a folder made read-only mid-run: one line, not a traceback
            raise WriteFailed.of(e) from e


def _segment(pipeline: CurriculumPipeline, root: Path, out: Path, files: list[Path], unreadable: dict[Path, str],
             settings: dict, resume: bool, *, batch_size: int, overlays: bool, workers: int, progress: bool,
             read_options: ReadOptions, t_start: float) -> RunSummary:
    """:func:`run_folder` in its claimed output folder, with its pipeline built."""
    names, journal, todo = plan_run(root, out, files, unreadable, settings, resume)
    done = journal.done()
    skipped = sum(journal.records[f.as_posix()].get("frames", 1) for f in files if f.as_posix() in done)
    writer = _Writer(out, journal, overlays)
    writer.start()
    ok, failed = 0, len(unreadable)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy")

    def flush(batch: list) -> None:
        nonlocal ok, failed
        if not batch:
            return
        results = segment_batch(pipeline, [im for _, _, im, _, _ in batch],
                                [f"{root}/{key}" for key, *_ in batch])
        for (key, mask_rel, im, dms, src), res in zip(batch, results):
            writer.put(key, mask_rel, im, res, None, dms, src)
            if isinstance(res, ImageResult):
                ok += 1
            else:
                failed += 1
        bar.update(len(batch))

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cp-decode") as pool:
            batch: list = []
            depth = max(2 * batch_size, 2 * workers)
            for f, decoded, decode_ms in _prefetch(pool, root, todo, depth, read_options):
                rel = f.as_posix()
                if isinstance(decoded, Exception):
                    writer.put(rel, names[rel], None, None, str(decoded), decode_ms)
                    failed += 1
                    bar.update(1)
                    bar.set_postfix(failed=failed)
                    continue
                items = _frames_todo(rel, names[rel], decoded, decode_ms, journal, done)
                if items and items[0][4] is not None and not items[0][4].remaining:
                    writer.put(None, "", None, None, None, 0.0, items[0][4])
                    items = []
                skipped += len(decoded.frames) - len(items)
                if len(items) != 1:
                    bar.total += len(items) - 1
                    bar.refresh()
                for item in items:
                    batch.append(item)
                    if len(batch) == batch_size:
                        flush(batch)
                        batch = []
            flush(batch)
    finally:
        bar.close()
        writer.close()
        if writer.error is None:
            journal.finalize()
        else:  # the disk may be full: keep the fsynced journal as it is for --resume
            journal.close()
    if writer.error is not None:
        raise WriteFailed.of(writer.error) from writer.error
    ok -= writer.demoted
    failed += writer.demoted + writer.file_failures
    summary = RunSummary(ok + failed + skipped, ok, failed, skipped, time.perf_counter() - t_start, out)
    write_run_info(out, summary.run_info(batch_size, settings))
    return summary


def _frames_todo(rel: str, mask_rel: str, decoded: Decoded, decode_ms: float, journal: RunJournal,
                 done: set[str]) -> list[tuple]:
    """Batch items ``(key, mask_rel, image, decode_ms, source)`` for the frames still to segment.

    A plain image needs no :class:`_Source`. When every frame of a file was done earlier, the one
    item returned carries the source with nothing ``remaining``: only the file outputs are left.
    """
    if len(decoded.frames) == 1 and decoded.write_back is None and not decoded.info:
        return [(rel, mask_rel, decoded.frames[0], decode_ms, None)]
    src = _Source(rel, decoded, mask_rel, earlier={})
    per_frame_ms = decode_ms / len(decoded.frames)
    items = []
    for key, label, image in zip(src.keys(), decoded.labels, decoded.frames):
        if src.multi and key in done:
            src.earlier[key] = journal.records[key]
        else:
            items.append((key, src.frame_mask_rel(label), image, per_frame_ms, src))
    src.remaining = len(items)
    return items or [(None, "", None, 0.0, src)]
