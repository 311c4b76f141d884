"""The run core both executors share: plan -> work items -> segment -> write -> journal.

:func:`plan_run` starts a run in its claimed output folder and lists what is left to do;
:func:`work_for` turns one decoded file into :class:`WorkItem` s (one per frame still to do) and,
for a file with several frames or a file-level output, a :class:`FileWork`; :func:`segment_batch`
runs the pipeline on a batch of items; a :class:`Writer` writes an item's mask and overlay and
returns its record; :func:`finish_file` builds a file's own outputs once all its frames are written;
:class:`cp_deploy.executors.ledger.Ledger` journals. The executors only schedule these steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cp_deploy.errors import InputError
from cp_deploy.executors.instances import instances_json, logits_npy
from cp_deploy.executors.names import file_output_rel, frame_key, frame_mask_rel, output_names, overlay_rel
from cp_deploy.executors.output import write_run_info
from cp_deploy.executors.records import error_record, file_record, folder_record, result_record, with_frame
from cp_deploy.files import atomic_write_bytes, encode_image, read_mask, remove_stale_temporaries, write_mask
from cp_deploy.formats import Decoded, ReadOptions, read_input
from cp_deploy.journal import RunJournal
from cp_deploy.pipeline import CurriculumPipeline, ImageResult
from cp_deploy.preprocess import to_rgb_uint8
from cp_deploy.visualize import draw_overlay

WriteBack = Callable[[list[np.ndarray]], dict[str, tuple[str, bytes]]]


@dataclass(frozen=True)
class WorkItem:
    """One image to segment and write: a plain image, a frame of a file, or a file that failed to decode."""

    key: str  # the journal key: the file's path, or ``path#label`` for one of several frames
    mask_rel: str  # under masks/
    image: np.ndarray | None
    decode_ms: float
    source: str | None = None  # the file of a frame that belongs to a FileWork; None for a plain image
    label: str = ""  # the frame's label in a file of several frames
    error: str | None = None  # why the file could not be decoded


@dataclass
class FileWork:
    """A file with several frames or a file-level output (DICOM-SEG, mask NIfTI) while its frames
    are written. Plain data, so the Ray executor can send it to the driver."""

    rel: str
    mask_rel: str
    labels: list[str]
    info: dict
    writes_back: bool  # the format has a file-level output
    earlier: list[str] = field(default_factory=list)  # frame keys done in an earlier run (--resume)

    @property
    def multi(self) -> bool:
        return len(self.labels) > 1

    def keys(self) -> list[str]:
        return [frame_key(self.rel, lab) for lab in self.labels]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FileWork:
        return cls(**json.loads(text))


@dataclass
class RunPlan:
    """A started run: mask names, the journal, what is left to do and what was done before."""

    names: dict[str, str]  # relative input path -> relative mask path
    journal: RunJournal
    todo: list[Path]
    done: set[str]  # journal keys whose records are ok and whose files exist
    skipped: int  # images (frames) of the files done before, not decoded again

    def done_frames(self) -> dict[str, list[str]]:
        """File still to do -> its frames done before (keys ``path#label``)."""
        todo = {f.as_posix() for f in self.todo}
        by_file: dict[str, list[str]] = {}
        for key in self.done:
            rel, _, label = key.rpartition("#")
            if label and rel in todo:
                by_file.setdefault(rel, []).append(key)
        return by_file


def plan_run(root: Path, out: Path, files: list[Path], unreadable: dict[Path, str], settings: dict,
             resume: bool) -> RunPlan:
    """Start a run in a claimed output folder (``claim_output``): its mask names, the journal
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
        journal.append([folder_record(root, rel, why) for rel, why in sorted(unreadable.items())])
    done = journal.done()
    skipped = sum(journal.records[f.as_posix()].get("frames", 1) for f in files if f.as_posix() in done)
    return RunPlan(output_names(files), journal, [f for f in files if f.as_posix() not in done], done, skipped)


def decode_timed(path: Path, options: ReadOptions | None = None) -> tuple[Decoded | Exception, float]:
    """The file decoded (or why not, recorded per file so the run goes on) and milliseconds taken."""
    t0 = time.perf_counter()
    try:
        return read_input(path, options), (time.perf_counter() - t0) * 1000
    except Exception as e:
        return e, (time.perf_counter() - t0) * 1000


def work_for(rel: str, mask_rel: str, decoded: Decoded | Exception, decode_ms: float,
             done: Collection[str]) -> tuple[FileWork | None, list[WorkItem]]:
    """The work items of one decoded file: its frames not in ``done``, each with a share of the
    decoding time. A plain image has no :class:`FileWork`; a file whose frames were all done
    before has a FileWork and no items (only its file-level outputs are left)."""
    if isinstance(decoded, Exception):
        return None, [WorkItem(rel, mask_rel, None, decode_ms, error=str(decoded))]
    if len(decoded.frames) == 1 and decoded.write_back is None and not decoded.info:
        return None, [WorkItem(rel, mask_rel, decoded.frames[0], decode_ms)]
    work = FileWork(rel, mask_rel, list(decoded.labels), decoded.info, decoded.write_back is not None)
    per_frame_ms = decode_ms / len(decoded.frames)
    items = []
    for key, label, image in zip(work.keys(), decoded.labels, decoded.frames):
        if work.multi and key in done:
            work.earlier.append(key)
        else:
            items.append(WorkItem(key, frame_mask_rel(mask_rel, label), image, per_frame_ms, rel, label))
    return work, items


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


def segment_items(pipeline: CurriculumPipeline, items: list[WorkItem], root: Path) -> list[ImageResult | str | None]:
    """:func:`segment_batch` over the decoded items; ``None`` for an item that failed to decode."""
    good = [it for it in items if it.error is None]
    results = iter(segment_batch(pipeline, [it.image for it in good], [f"{root}/{it.key}" for it in good]))
    return [None if it.error is not None else next(results) for it in items]


@dataclass(frozen=True)
class Extras:
    """Optional per-image outputs beside the mask: COCO instances (``--coco``), low-res logits
    (``--save-logits``). Each lands in the record's ``outputs``, so ``--resume`` redoes an image
    whose file is missing."""

    coco: bool = False
    logits: bool = False


def write_outputs(out: Path, key: str, mask_rel: str, image: np.ndarray | None, result: ImageResult | str,
                  decode_ms: float, overlays: bool, extras: Extras = Extras()) -> dict:
    """Write one image's mask (and overlay, and ``extras``) atomically and return its record;
    ``result`` is the error message of an image that failed."""
    if not isinstance(result, ImageResult):
        return error_record(key, result)
    t0 = time.perf_counter()
    rec = result_record(key, mask_rel, result)
    write_mask(out / rec["mask"], result.mask)
    if overlays:
        ov_rel = overlay_rel(mask_rel)
        atomic_write_bytes(out / ov_rel, encode_image(draw_overlay(to_rgb_uint8(image), result), ".jpg"))
        rec["overlay"] = ov_rel
    written = {}
    if extras.coco:
        written["instances"] = (file_output_rel(mask_rel, ".instances.json"), instances_json(key, result))
    if extras.logits:
        written["logits"] = (file_output_rel(mask_rel, ".logits.npy"), logits_npy(result))
    for kind, (rel, data) in written.items():
        atomic_write_bytes(out / rel, data)
        rec.setdefault("outputs", {})[kind] = rel
    rec["timings_ms"]["decode"] = round(decode_ms, 3)
    rec["timings_ms"]["write"] = round((time.perf_counter() - t0) * 1000, 3)
    return rec


class Writer:
    """Writes work items' outputs and returns their records, never over a mask that another key
    wrote through this writer (``output_names`` should make that impossible)."""

    def __init__(self, out: Path, overlays: bool, extras: Extras = Extras()) -> None:
        self.out, self.overlays, self.extras = out, overlays, extras
        self.owners: dict[str, str] = {}  # mask path -> the key that wrote it

    def write(self, item: WorkItem, result: ImageResult | str | None) -> dict:
        if item.error is not None:
            return error_record(item.key, item.error)
        if isinstance(result, ImageResult):
            owner = self.owners.setdefault(item.mask_rel, item.key)
            if owner != item.key:
                result = (f"{item.key}: its mask masks/{item.mask_rel} was already written for {owner} in this "
                          "run; rename one of the two inputs")
        rec = write_outputs(self.out, item.key, item.mask_rel, item.image, result, item.decode_ms, self.overlays,
                            self.extras)
        return with_frame(rec, item.source, item.label) if item.label else rec


def finish_file(out: Path, work: FileWork, records: dict[str, dict], masks: dict[str, np.ndarray],
                write_back: WriteBack | None) -> dict:
    """All frames of ``work`` are written (``records`` has every frame's): write its file-level
    outputs from the frames' masks (read back from their PNGs where not in ``masks``) and return
    the file's record. A failed output keeps the masks and makes the file an error."""
    keys = work.keys()
    failed = [k for k in keys if records.get(k, {}).get("status") != "ok"]
    outputs: dict[str, str] = {}
    error = None
    if failed:
        error = f"{len(failed)} of {len(keys)} frames failed, so the file's own outputs were not written"
    elif write_back is not None:
        try:
            frames = [masks[k] if k in masks else read_mask(out / records[k]["mask"]) for k in keys]
            for kind, (suffix, data) in write_back(frames).items():
                out_rel = file_output_rel(work.mask_rel, suffix)
                atomic_write_bytes(out / out_rel, data)
                outputs[kind] = out_rel
        except Exception as e:
            # An InputError already names the file and the fix; anything else is unexpected.
            error = str(e) if isinstance(e, InputError) else (
                f"{work.rel}: writing the {work.info.get('format', 'format')} output failed: {e!r}")
    return file_record(work.rel, len(keys), work.info, None if work.multi else records[work.rel], outputs, error)
