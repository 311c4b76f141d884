"""Single-process executor: decode in worker threads, infer in batches, write in the background.

It only schedules the run core (:mod:`cp_deploy.executors.core`): a bounded thread pool decodes
files ahead of the model, the main thread gathers batches of work items and segments them, or
hands them to model workers (``model_workers``: pipeline replicas, each in its own thread with
its share of the cores, taking the next batch when free), and a writer thread writes each item's
outputs atomically and only then journals its record, so a killed run never records an image
whose outputs are missing. A file's own output (DICOM-SEG, mask NIfTI) is written by the writer
thread once the file's last frame is written, from the masks in memory.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from cp_deploy.bundle import load_bundle
from cp_deploy.errors import InputError, WriteFailed
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

# --model-workers auto on a CPU: threads per model worker by engine; 1: one single-thread worker
# per core, 0 (or an engine missing here): one worker whose runtime takes every core. Rough, on
# the 2-core VM, 2026-12-01, at 18cc96b plus this change, other jobs on the CPU (load 5-11, so
# 2-4x below an idle machine's figures); images/s of 1 worker x 2 threads | 2 workers x 1 thread,
# each pair run back to back, repeats in order (benchmarks/RESULTS.md "Model workers"):
#   torch        0.092 0.063       | 0.193 0.157
#   onnxruntime  0.254 0.156       | 0.435 0.292
#   openvino     0.361 0.223 0.201 | 0.321 0.283 0.250  (close: a third pair broke the tie)
# cp-deploy batch --input IN20 --output OUT --overwrite --no-progress --device cpu --engine E
#   [--graphs G] --model-workers 1 --threads 2 | --model-workers 2 --threads 1
# (IN20: the 5 examples/images cycled to 20; G: cp-export onnx of the default bundle.)
AUTO_CPU_THREADS = {"torch": 1, "onnxruntime": 1, "openvino": 1}


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Arrangement:
    """How a local run spreads the model over the machine: ``workers`` pipeline replicas, each in
    its own thread with ``threads`` runtime threads (0: the runtime's default, every core).
    Recorded in ``run.json``'s provenance, not its settings: which replica segments an image
    changes nothing, and the thread count changes masks only as ``--threads`` always could (a
    boundary pixel, from another order of summation), so ``--resume`` may change it."""

    workers: int
    threads: int
    requested: int | str  # the --model-workers value it came from

    def provenance(self) -> dict:
        return {"model_workers": self.workers, "threads_per_worker": self.threads, "requested": self.requested,
                "cores": cpu_cores()}


def model_workers_value(text: str | int) -> int | str:
    """``--model-workers`` as given: ``auto`` or a count of at least 1 (else a one-line :class:`InputError`)."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputError(f"--model-workers {text}: must be auto or a whole number of at least 1; pass auto or N >= 1")
    return n


def arrange(requested: int | str, engine: str, device: str, threads: int = 0) -> Arrangement:
    """``--model-workers`` resolved: ``auto`` is 1 on a GPU, or with ``threads`` set (the user
    chose the runtime's threads), else :data:`AUTO_CPU_THREADS`'s arrangement for ``engine``;
    N workers without ``threads`` share the cores evenly."""
    requested = model_workers_value(requested)
    if requested == "auto":
        per = AUTO_CPU_THREADS.get(engine, 0) if device == "cpu" and not threads else 0
        workers = max(1, cpu_cores() // per) if per else 1
        return Arrangement(workers, threads or (per if workers > 1 else 0), requested)
    n = int(requested)
    return Arrangement(n, threads or (max(1, cpu_cores() // n) if n > 1 else 0), requested)


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
    """Writes what the main thread and the model workers queue (:class:`Writer`), journals it
    (:class:`Ledger`) and finishes each file after its last frame; an error stops the writing and
    reaches the thread that queues next, at its :meth:`put`."""

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


class _ModelWorkers:
    """Segments batches on ``pipelines`` (replicas of one pipeline) and queues each item's result
    to the writer. With several, each replica runs in its own thread and takes the next batch when
    it is free; the first error (a write that failed, an interrupt raised in the model) stops them
    and reaches the main thread at its next :meth:`submit` or at :meth:`close`. With one, batches
    run on the calling thread, as before there were workers.

    Which worker takes a batch changes only the order records reach the journal: ``results.jsonl``
    is sorted by path when the run finishes (``RunJournal.finalize``)."""

    def __init__(self, pipelines: list[CurriculumPipeline], root: Path, writer: _WriterThread,
                 done: Callable[[int], None]) -> None:
        self.pipelines, self.root, self.writer, self.done = pipelines, root, writer, done
        self.error: BaseException | None = None
        self._stop = False
        self._ending = False  # the sentinels are queued
        # One batch waiting per worker: enough that none waits for the main thread, and the
        # decoded images held stay bounded.
        self.q: queue.Queue = queue.Queue(maxsize=len(pipelines))
        self.threads = [threading.Thread(target=self._work, args=(p,), daemon=True, name=f"cp-model-{i}")
                        for i, p in enumerate(pipelines)] if len(pipelines) > 1 else []
        for t in self.threads:
            t.start()

    def _segment(self, pipeline: CurriculumPipeline, batch: list[WorkItem]) -> None:
        for item, result in zip(batch, segment_items(pipeline, batch, self.root)):
            self.writer.put(item, result)
        self.done(len(batch))

    def _work(self, pipeline: CurriculumPipeline) -> None:
        while (batch := self.q.get()) is not None:
            if self.error is not None or self._stop:
                continue  # drain to the sentinel
            try:
                self._segment(pipeline, batch)
            except BaseException as e:  # surfaced to the main thread
                self.error = self.error or e

    def submit(self, batch: list[WorkItem]) -> None:
        """Segment ``batch`` now (one pipeline) or on the next free worker."""
        if not self.threads:
            self._segment(self.pipelines[0], batch)
            return
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(batch, timeout=0.2)  # a timeout, so a worker's error is seen while all are busy
                return
            except queue.Full:
                pass

    def close(self, finish: bool = True) -> None:
        """Stop the workers once they have segmented what is queued (``finish``), or only what
        they are segmenting now (an interrupted run); raises a worker's error when finishing."""
        if not self.threads:
            return
        self._stop = self._stop or not finish
        if not self._ending:  # once: a second close (after an interrupted join) must not block on a full queue
            self._ending = True
            for _ in self.threads:
                self.q.put(None)
        for t in self.threads:
            t.join()
        self.threads = []
        if finish and self.error is not None:
            raise self.error


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
    model_workers: int | str = "auto",
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir``; see the module docstring.

    ``read_options`` carries the DICOM/NIfTI settings (slice axis, UIDs in the records). Given a
    :class:`PipelineFactory`, the output folder is checked (``claim_output``) before the
    models load; ``overwrite`` lets a non-empty one be replaced, ``resume`` continues its run.
    ``coco`` writes each image's instances and then ``OUT/instances.json``, ``save_logits`` each
    image's low-res logits (:mod:`cp_deploy.executors.instances`). ``model_workers`` (:func:`arrange`)
    builds that many replicas from a factory, each with its own copy of the models; a pipeline
    built by hand runs alone.
    """
    t_start = time.perf_counter()
    if coco:
        check_coco()
    out = Path(output_dir)
    read_options = read_options or ReadOptions()
    if isinstance(pipeline, PipelineFactory):
        bundle = load_bundle(pipeline.bundle)  # checked, not built: the networks load after the checks
        settings = pipeline.settings(read_options.slice_axis, bundle)
        arrangement = arrange(model_workers, pipeline.engine, pipeline.device, pipeline.threads)
    else:
        settings = pipeline_settings(pipeline, read_options.slice_axis)
        model_workers = model_workers_value(model_workers)
        arrangement = Arrangement(1, 0, model_workers)
        if model_workers not in ("auto", 1):
            raise InputError(f"model_workers={model_workers}: a pipeline built by hand cannot be replicated; pass "
                             "a PipelineFactory, or model_workers=1")
    settings.provenance["arrangement"] = arrangement.provenance()
    inputs = list_inputs(input_dir)
    root, files, unreadable = inputs.root, inputs.files, inputs.unreadable
    torch_threads = torch.get_num_threads()
    with claim_output(inputs, out, settings, resume=resume, overwrite=overwrite):
        try:
            if isinstance(pipeline, PipelineFactory):
                factory = replace(pipeline, threads=arrangement.threads)
                if factory.threads:  # here: OpenMP keeps a thread count per calling thread
                    torch.set_num_threads(factory.threads)
                # Replicas load side by side: compiling and reading weights release the GIL.
                with ThreadPoolExecutor(max_workers=arrangement.workers, thread_name_prefix="cp-load") as pool:
                    pipelines = list(pool.map(lambda _: factory(bundle), range(arrangement.workers)))
            else:
                pipelines = [pipeline]
            try:
                return _segment(pipelines, root, out, files, unreadable, settings, resume, batch_size=batch_size,
                                overlays=overlays, workers=workers, progress=progress, read_options=read_options,
                                t_start=t_start, extras=Extras(coco, save_logits))
            except OSError as e:  # a full disk or a folder made read-only mid-run: one line, not a traceback
                raise WriteFailed.of(e) from e
        finally:
            # The factory set torch's process-wide thread count for this run's workers, not for the caller.
            torch.set_num_threads(torch_threads)


def _segment(pipelines: list[CurriculumPipeline], root: Path, out: Path, files: list[Path],
             unreadable: dict[Path, str], settings: dict, resume: bool, *, batch_size: int, overlays: bool,
             workers: int, progress: bool, read_options: ReadOptions, t_start: float,
             extras: Extras = Extras()) -> RunSummary:
    """:func:`run_folder` in its claimed output folder, with its pipelines built."""
    plan = plan_run(root, out, files, unreadable, settings, resume)
    ledger = Ledger(plan.journal, plan.skipped, len(unreadable))
    writer = _WriterThread(out, Writer(out, overlays, extras), ledger)
    writer.start()
    bar = tqdm(total=len(plan.todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy")
    bar_lock = threading.Lock()  # the model workers and the main thread move the bar
    decode_failed = 0

    def segmented(n: int) -> None:
        with bar_lock:
            bar.update(n)

    models = _ModelWorkers(pipelines, root, writer, segmented)
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
                    with bar_lock:
                        bar.total += len(items) - 1
                        bar.refresh()
                for item in items:
                    if item.error is not None:  # journalled now, not held for a batch
                        writer.put(item, None)
                        decode_failed += 1
                        with bar_lock:
                            bar.update(1)
                            bar.set_postfix(failed=decode_failed)
                        continue
                    batch.append(item)
                    if len(batch) == batch_size:
                        models.submit(batch)
                        batch = []
            if batch:
                models.submit(batch)
        models.close()
    finally:
        models.close(finish=False)  # after an error: the batches being segmented are written, no more
        bar.close()
        writer.close()
        if writer.error is None:
            plan.journal.finalize()
        else:  # the disk may be full: keep the fsynced journal as it is for --resume
            plan.journal.close()
    if writer.error is not None:
        raise WriteFailed.of(writer.error) from writer.error
    if extras.coco:
        write_coco(out, plan.journal.records, pipelines[0].bundle.prompt.text)
    return ledger.summarise(out, time.perf_counter() - t_start, batch_size, settings)
