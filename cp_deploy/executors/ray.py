"""Scale-out executor on Ray Data: the run core of the local executor, scheduled over Ray tasks
and a pool of actors on one machine or a cluster.

The driver lists the inputs (it needs the whole list for collision-free mask names and for
``--resume``) and keeps the run journal through the same :class:`Ledger`. Decoding runs as Ray
Data tasks, one row per frame still to do (DICOM frames, NIfTI slices and TIFF pages alike), the
first row of a file carrying its :class:`FileWork`; inference is ``map_batches`` over an actor
pool in which each actor builds the pipeline once, writes its items' masks and overlays
atomically and only then returns their records. Once a file's frames are all recorded, a Ray
task writes its file-level output from the frame masks on disk and returns the file's record.
Records are keyed by journal key, so a batch that Ray runs again after a worker died still
leaves one line per image, and an image whose record never reached the driver is redone by
``--resume``. Output folders must be on a file system that every node sees.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cp_deploy.bundle import load_bundle
from cp_deploy.errors import MissingExtraError, WriteFailed
from cp_deploy.executors import PipelineFactory, core
from cp_deploy.executors.core import Extras, FileWork, WorkItem, WriteBack
from cp_deploy.executors.inputs import list_inputs
from cp_deploy.executors.instances import check_coco, write_coco
from cp_deploy.executors.ledger import Ledger
from cp_deploy.executors.output import claim_output
from cp_deploy.executors.records import RunSummary
from cp_deploy.formats import ReadOptions

FINISH_CPUS = 0.25  # a file-level output is light next to segmentation; it must not wait for a whole CPU


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] part of the extra
    except ImportError as e:
        raise MissingExtraError.for_feature("--executor ray (Ray Data)", "ray") from e
    return ray


def _pack(image: np.ndarray | None) -> bytes:
    # np.save keeps dtype and any number of dimensions (uint16 greyscale next to RGB), which a
    # tensor column of one shape family would not.
    if image is None:
        return b""
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> np.ndarray | None:
    return np.load(io.BytesIO(data), allow_pickle=False) if data else None


def _row(item: WorkItem | None, work: FileWork | None) -> dict:
    """A work item as a Ray Data row; without an item (``key`` empty) the row only carries ``work``."""
    item = item or WorkItem("", "", None, 0.0)
    return {"key": item.key, "mask_rel": item.mask_rel, "image": _pack(item.image), "decode_ms": item.decode_ms,
            "source": item.source or "", "label": item.label, "failed": item.error is not None,
            "error": item.error or "", "file": work.to_json() if work else ""}


def _item(row: dict) -> WorkItem:
    return WorkItem(str(row["key"]), str(row["mask_rel"]), _unpack(row["image"]), float(row["decode_ms"]),
                    str(row["source"]) or None, str(row["label"]), str(row["error"]) if row["failed"] else None)


def decode_rows(row: dict, root: str, options: ReadOptions) -> list[dict]:
    """A Ray Data task: decode one listed file into the rows of its work items; the first row
    also carries the file's :class:`FileWork`, alone where its frames were all done before."""
    rel = row["path"]
    decoded, ms = core.decode_timed(Path(root) / rel, options)
    work, items = core.work_for(rel, row["mask_rel"], decoded, ms, set(json.loads(row["done"])))
    rows = [_row(item, work if i == 0 else None) for i, item in enumerate(items)]
    return rows or [_row(None, work)]


class _Segmenter:
    """One pool actor: builds the pipeline once, then segments and writes the batches it is given."""

    def __init__(self, factory: PipelineFactory, root: str, out: str, overlays: bool, extras: Extras) -> None:
        self.pipeline = factory()
        self.root = Path(root)
        self.writer = core.Writer(Path(out), overlays, extras)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
        items = [_item(r) for r in rows if r["key"]]
        results = core.segment_items(self.pipeline, items, self.root)
        written = iter([json.dumps(self.writer.write(item, result), separators=(",", ":"))
                        for item, result in zip(items, results)])
        records = [next(written) if r["key"] else "" for r in rows]  # a row that only carries its file: none
        return {"record": np.array(records, dtype=object), "source": batch["source"], "file": batch["file"]}


def _finish_task(root: str, out: str, options: ReadOptions, work: FileWork, records: dict[str, dict]) -> dict:
    """A Ray task: a file's outputs from its frames' masks on disk. The file is decoded again for
    its write-back, which holds the source's header and does not travel between nodes."""
    write_back: WriteBack | None = None
    if work.writes_back:
        decoded, _ = core.decode_timed(Path(root) / work.rel, options)
        write_back = _raising(decoded) if isinstance(decoded, Exception) else decoded.write_back
    return core.finish_file(Path(out), work, records, {}, write_back)


def _raising(error: Exception) -> WriteBack:
    def write_back(masks: list[np.ndarray]) -> dict[str, tuple[str, bytes]]:
        raise error

    return write_back


def run_folder_ray(
    factory: PipelineFactory,
    input_dir: str | Path,
    output_dir: str | Path,
    batch_size: int = 1,
    overlays: bool = False,
    resume: bool = False,
    num_workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    read_options: ReadOptions | None = None,
    coco: bool = False,
    save_logits: bool = False,
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir`` on a Ray cluster.

    Joins the cluster at ``address`` (or the one this process is already connected to; with
    neither, starts a local one and stops it afterwards). ``num_workers`` actors each build
    ``factory()`` once and get ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs. A worker
    that dies is restarted and its batch rerun by Ray Data's actor pool, whose defaults are
    ``max_restarts=-1`` and ``max_task_retries=-1`` (this module does not pass them: Ray 2.60
    deprecates per-call remote args). Same inputs, outputs, journal and ``resume`` as
    :func:`cp_deploy.executors.local.run_folder`, and the same checks and lock of the output folder
    (held by this driver).
    """
    ray = _import_ray()
    if coco:
        check_coco()
    out = Path(output_dir).resolve()
    read_options = read_options or ReadOptions()
    bundle = load_bundle(factory.bundle)
    settings = factory.settings(read_options.slice_axis, bundle)
    extras = Extras(coco, save_logits)
    inputs = list_inputs(input_dir)
    root, files, unreadable = inputs.root.resolve(), inputs.files, inputs.unreadable
    with claim_output(inputs, out, settings, resume=resume, overwrite=overwrite):
        try:
            return _run(ray, factory, root, out, files, unreadable, settings, resume, batch_size=batch_size,
                        overlays=overlays, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                        cpus_per_worker=cpus_per_worker, address=address, progress=progress,
                        read_options=read_options, extras=extras, category=bundle.prompt.text)
        except OSError as e:  # the driver's journal on a full disk: one line, not a traceback
            raise WriteFailed.of(e) from e


def _run(ray, factory: PipelineFactory, root: Path, out: Path, files: list[Path], unreadable: dict[Path, str],
         settings: dict, resume: bool, *, batch_size: int, overlays: bool, num_workers: int, gpus_per_worker: float,
         cpus_per_worker: float, address: str | None, progress: bool, read_options: ReadOptions,
         extras: Extras = Extras(), category: str = "lesion") -> RunSummary:
    """:func:`run_folder_ray` in its claimed output folder; ``category`` names the COCO instances."""
    t_start = time.perf_counter()
    plan = core.plan_run(root, out, files, unreadable, settings, resume)
    ledger = Ledger(plan.journal, plan.skipped, len(unreadable))
    started = bool(plan.todo) and not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress)
    bar = tqdm(total=len(plan.todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy[ray]")
    try:
        if plan.todo:
            _stream(ray, factory, root, out, plan, ledger, bar, batch_size=batch_size, overlays=overlays,
                    num_workers=num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                    read_options=read_options, extras=extras)
    finally:
        bar.close()
        ledger.flush()
        plan.journal.finalize()
        if started:
            ray.shutdown()
    if extras.coco:
        write_coco(out, plan.journal.records, category)
    return ledger.summarise(out, time.perf_counter() - t_start, batch_size, settings)


def _stream(ray, factory: PipelineFactory, root: Path, out: Path, plan: core.RunPlan, ledger: Ledger, bar: tqdm, *,
            batch_size: int, overlays: bool, num_workers: int, gpus_per_worker: float, cpus_per_worker: float,
            read_options: ReadOptions, extras: Extras = Extras()) -> None:
    """Run the dataset and journal its records as they stream back; finish each complete file."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would interleave with it
    done_frames = plan.done_frames()
    items = [{"path": f.as_posix(), "mask_rel": plan.names[f.as_posix()],
              "done": json.dumps(done_frames.get(f.as_posix(), []))} for f in plan.todo]
    # Several blocks per worker keep every actor busy; at most 256 files per block bound a
    # decoding task's memory and what a retry has to redo.
    blocks = max(min(len(items), 4 * num_workers), -(-len(items) // 256))
    ds = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .flat_map(decode_rows, fn_kwargs={"root": str(root), "options": read_options})
        .map_batches(
            _Segmenter,
            fn_constructor_kwargs={"factory": factory, "root": str(root), "out": str(out), "overlays": overlays,
                                   "extras": extras},
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker,
        )
    )
    finish = ray.remote(num_cpus=FINISH_CPUS)(_finish_task)
    finishing: dict = {}  # object ref -> (file, its frame records)

    def start(ready: list[FileWork]) -> None:
        for work in ready:
            records, _ = ledger.inputs(work)  # masks are read back from disk where the task runs
            ref = finish.remote(str(root), str(out), read_options, work, records)
            finishing[ref] = (work, records)

    def collect(timeout: float | None) -> None:
        refs, _ = ray.wait(list(finishing), num_returns=len(finishing), timeout=timeout)
        for ref in refs:
            work, records = finishing.pop(ref)
            ledger.close(work, ray.get(ref), records)

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for record, source, file in zip(batch["record"], batch["source"], batch["file"]):
            if file:
                work = FileWork.from_json(file)
                if len(work.keys()) - len(work.earlier) != 1:
                    bar.total += len(work.keys()) - len(work.earlier) - 1
                    bar.refresh()
                start(ledger.open(work))
            if record:
                start(ledger.add(json.loads(record), str(source) or None))
                bar.update(1)
        if finishing:
            collect(timeout=0)
        ledger.flush()
    while finishing:
        collect(timeout=None)
    ledger.flush()
