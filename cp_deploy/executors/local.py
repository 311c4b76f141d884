"""Single-process executor: decode in worker threads, infer in batches, write in the background.

It only schedules the run core (:mod:`cp_deploy.executors.core`): a bounded thread pool decodes
files ahead of the model, the main thread segments batches of work items, and a writer thread
writes each item's outputs atomically and only then journals its record, so a killed run never
records an image whose outputs are missing. A file's own output (DICOM-SEG, mask NIfTI) is
written by the writer thread once the file's last frame is written, from the masks in memory.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from cp_deploy.bundle import load_bundle
from cp_deploy.errors import WriteFailed
from cp_deploy.executors import PipelineFactory, pipeline_settings
from cp_deploy.executors.core import (
    Extras,
    FileWork,
    WorkItem,
    WriteBack,
    Writer,
    decode_timed,
    finish_file,
    plan_run,
    segment_items,
    work_for,
)
from cp_deploy.executors.inputs import list_inputs
from cp_deploy.executors.instances import check_coco, write_coco
from cp_deploy.executors.ledger import Ledger
from cp_deploy.executors.output import claim_output
from cp_deploy.executors.records import RunSummary
from cp_deploy.formats import Decoded, ReadOptions
from cp_deploy.pipeline import CurriculumPipeline, ImageResult


def _prefetch(pool: ThreadPoolExecutor, root: Path, files: list[Path], depth: int,
              options: ReadOptions) -> Iterator[tuple[Path, Decoded | Exception, float]]:
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


class _WriterThread(threading.Thread):
    """Writes what the main thread queues (:class:`Writer`), journals it (:class:`Ledger`) and
    finishes each file after its last frame; an error stops the writing and reaches the main
    thread at its next :meth:`put`."""

    def __init__(self, out: Path, writer: Writer, ledger: Ledger) -> None:
        super().__init__(daemon=True, name="cp-writer")
        self.out, self.writer, self.ledger = out, writer, ledger
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self._write_backs: dict[str, WriteBack | None] = {}

    def run(self) -> None:
        while (msg := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._handle(*msg)
            except BaseException as e:  # surfaced to the main thread
                self.error = e

    def _handle(self, what: FileWork | WorkItem, extra: WriteBack | ImageResult | str | None) -> None:
        if isinstance(what, FileWork):
            self._write_backs[what.rel] = extra
            ready = self.ledger.open(what)
        else:
            rec = self.writer.write(what, extra)
            ready = self.ledger.add(rec, what.source, extra.mask if rec["status"] == "ok" else None)
        for work in ready:
            records, masks = self.ledger.inputs(work)
            rec = finish_file(self.out, work, records, masks, self._write_backs.pop(work.rel))
            self.ledger.close(work, rec, records)
        self.ledger.flush()

    def _queue(self, msg: tuple) -> None:
        if self.error is not None:
            raise WriteFailed.of(self.error) from self.error
        self.q.put(msg)

    def open_file(self, work: FileWork, write_back: WriteBack | None) -> None:
        """Expect the frames of ``work`` (queued before them)."""
        self._queue((work, write_back))

    def put(self, item: WorkItem, result: ImageResult | str | None) -> None:
        self._queue((item, result))

    def close(self) -> None:
        """Write what is queued and stop; the caller checks ``error``."""
        self.q.put(None)
        self.join()


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
    coco: bool = False,
    save_logits: bool = False,
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir``; see the module docstring.

    ``read_options`` carries the DICOM/NIfTI settings (slice axis, UIDs in the records). Given a
    :class:`PipelineFactory`, the output folder is checked (``claim_output``) before the
    models load; ``overwrite`` lets a non-empty one be replaced, ``resume`` continues its run.
    ``coco`` writes each image's instances and then ``OUT/instances.json``, ``save_logits`` each
    image's low-res logits (:mod:`cp_deploy.executors.instances`).
    """
    t_start = time.perf_counter()
    if coco:
        check_coco()
    out = Path(output_dir)
    read_options = read_options or ReadOptions()
    if isinstance(pipeline, PipelineFactory):
        bundle = load_bundle(pipeline.bundle)  # checked, not built: the networks load after the checks
        settings = pipeline.settings(read_options.slice_axis, bundle)
    else:
        settings = pipeline_settings(pipeline, read_options.slice_axis)
    inputs = list_inputs(input_dir)
    root, files, unreadable = inputs.root, inputs.files, inputs.unreadable
    with claim_output(inputs, out, settings, resume=resume, overwrite=overwrite):
        if isinstance(pipeline, PipelineFactory):
            pipeline = pipeline(bundle)
        try:
            return _segment(pipeline, root, out, files, unreadable, settings, resume, batch_size=batch_size,
                            overlays=overlays, workers=workers, progress=progress, read_options=read_options,
                            t_start=t_start, extras=Extras(coco, save_logits))
        except OSError as e:  # a full disk or a folder made read-only mid-run: one line, not a traceback
            raise WriteFailed.of(e) from e


def _segment(pipeline: CurriculumPipeline, root: Path, out: Path, files: list[Path], unreadable: dict[Path, str],
             settings: dict, resume: bool, *, batch_size: int, overlays: bool, workers: int, progress: bool,
             read_options: ReadOptions, t_start: float, extras: Extras = Extras()) -> RunSummary:
    """:func:`run_folder` in its claimed output folder, with its pipeline built."""
    plan = plan_run(root, out, files, unreadable, settings, resume)
    ledger = Ledger(plan.journal, plan.skipped, len(unreadable))
    writer = _WriterThread(out, Writer(out, overlays, extras), ledger)
    writer.start()
    bar = tqdm(total=len(plan.todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy")
    decode_failed = 0

    def flush(batch: list[WorkItem]) -> None:
        for item, result in zip(batch, segment_items(pipeline, batch, root)):
            writer.put(item, result)
        bar.update(len(batch))

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cp-decode") as pool:
            batch: list[WorkItem] = []
            depth = max(2 * batch_size, 2 * workers)
            for f, decoded, decode_ms in _prefetch(pool, root, plan.todo, depth, read_options):
                rel = f.as_posix()
                work, items = work_for(rel, plan.names[rel], decoded, decode_ms, plan.done)
                if work is not None:
                    writer.open_file(work, decoded.write_back)
                if len(items) != 1:
                    bar.total += len(items) - 1
                    bar.refresh()
                for item in items:
                    if item.error is not None:  # journalled now, not held for a batch
                        writer.put(item, None)
                        decode_failed += 1
                        bar.update(1)
                        bar.set_postfix(failed=decode_failed)
                        continue
                    batch.append(item)
                    if len(batch) == batch_size:
                        flush(batch)
                        batch = []
            if batch:
                flush(batch)
    finally:
        bar.close()
        writer.close()
        if writer.error is None:
            plan.journal.finalize()
        else:  # the disk may be full: keep the fsynced journal as it is for --resume
            plan.journal.close()
    if writer.error is not None:
        raise WriteFailed.of(writer.error) from writer.error
    if extras.coco:
        write_coco(out, plan.journal.records, pipeline.bundle.prompt.text)
    return ledger.summarise(out, time.perf_counter() - t_start, batch_size, settings)
