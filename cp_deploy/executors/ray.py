"""Scale-out executor on Ray Data: the same decoding, pipeline and writing as the local executor,
spread over a pool of actors on one machine or a cluster.

The driver lists the inputs (it needs the whole list for collision-free mask names and for
``--resume``) and keeps the run journal. Decoding runs as Ray Data tasks; inference is
``map_batches`` over an actor pool in which each actor builds the pipeline once. An actor writes
an image's mask and overlay atomically, exactly as the local writer does, and only then returns
the image's record; the driver appends records to the journal as they stream back. The journal
keys records by image path, so a batch that Ray runs again after a worker died still leaves one
line per image in ``results.jsonl``, and an image whose record never reached the driver is simply
redone by ``--resume``. Output folders must be on a file system that every node sees.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cp_deploy import MissingExtraError
from cp_deploy.executors import PipelineFactory
from cp_deploy.executors.local import RunSummary, decode_timed, list_inputs, plan_run, segment_batch, write_outputs
from cp_deploy.executors.output import WriteFailed, claim_output, write_run_info
from cp_deploy.formats import ReadOptions
from cp_deploy.io import InputError

RAY_EXTRA = "pip install 'curriculum-prompting[ray]'"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] part of the extra
    except ImportError as e:
        raise MissingExtraError(f"--executor ray needs Ray Data, which is not installed: {RAY_EXTRA}") from e
    return ray


def _pack(image: np.ndarray) -> bytes:
    # np.save keeps dtype and any number of dimensions (uint16 greyscale next to RGB), which a
    # tensor column of one shape family would not.
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_row(row: dict, root: str, options: ReadOptions) -> dict:
    """A Ray Data task: decode one listed image with the local executor's decoder.

    Ray runs list ordinary image files only, but a TIFF may hold several pages; those need the
    local executor's per-frame journal, so such a file is an error record, never cut to a page."""
    decoded, ms = decode_timed(Path(root) / row["path"], options)
    if not isinstance(decoded, Exception) and len(decoded.frames) > 1:
        decoded = InputError(f"{Path(root) / row['path']}: holds {len(decoded.frames)} frames (pages); "
                             "--executor ray segments single-frame images only: run it with --executor local")
    failed = isinstance(decoded, Exception)
    return {**row, "image": b"" if failed else _pack(decoded.frames[0]), "error": str(decoded) if failed else "",
            "decode_ms": ms}


class _Segmenter:
    """One pool actor: builds the pipeline once, then segments and writes the batches it is given."""

    def __init__(self, factory: PipelineFactory, root: str, out: str, overlays: bool) -> None:
        self.pipeline = factory()
        self.root, self.out, self.overlays = Path(root), Path(out), overlays

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]
        good = [r for r in rows if not r["error"]]
        images = [_unpack(r["image"]) for r in good]
        results = dict(zip((r["path"] for r in good),
                           segment_batch(self.pipeline, images, [str(self.root / r["path"]) for r in good])))
        images_by_path = dict(zip((r["path"] for r in good), images))
        records = [
            write_outputs(self.out, str(r["path"]), str(r["mask_rel"]), images_by_path.get(r["path"]),
                          results.get(r["path"], str(r["error"])), float(r["decode_ms"]), self.overlays)
            for r in rows
        ]
        return {"record": np.array([json.dumps(rec, separators=(",", ":")) for rec in records], dtype=object)}


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
) -> RunSummary:
    """Segment every image under ``input_dir`` into ``output_dir`` on a Ray cluster.

    Joins the cluster at ``address`` (or the one this process is already connected to; with
    neither, starts a local one and stops it afterwards). ``num_workers`` actors each build
    ``factory()`` once and get ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs. A worker
    that dies is restarted and its batch rerun by Ray Data's actor pool, whose defaults are
    ``max_restarts=-1`` and ``max_task_retries=-1`` (this module does not pass them: Ray 2.60
    deprecates per-call remote args). Same outputs, journal and ``resume`` as
    :func:`cp_deploy.executors.local.run_folder`, and the same checks and lock of the output folder
    (held by this driver).
    """
    ray = _import_ray()
    root, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    settings = factory.settings()
    files, unreadable = list_inputs(root, medical=False)
    with claim_output(root, out, settings, resume=resume, overwrite=overwrite):
        try:
            return _run(ray, factory, root, out, files, unreadable, settings, resume, batch_size=batch_size,
                        overlays=overlays, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                        cpus_per_worker=cpus_per_worker, address=address, progress=progress,
                        read_options=read_options or ReadOptions())
        except OSError as e:  # the driver's journal on a full disk: one line, not a traceback
            raise WriteFailed.of(e) from e


def _run(ray, factory: PipelineFactory, root: Path, out: Path, files: list[Path], unreadable: dict[Path, str],
         settings: dict, resume: bool, *, batch_size: int, overlays: bool, num_workers: int, gpus_per_worker: float,
         cpus_per_worker: float, address: str | None, progress: bool, read_options: ReadOptions) -> RunSummary:
    """:func:`run_folder_ray` in its claimed output folder."""
    t_start = time.perf_counter()
    names, journal, todo = plan_run(root, out, files, unreadable, settings, resume)
    started = bool(todo) and not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, desc="cp-deploy[ray]")
    try:
        if todo:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts images; Ray's would interleave with it
            items = [{"path": f.as_posix(), "mask_rel": names[f.as_posix()]} for f in todo]
            # Several blocks per worker keep every actor busy; at most 256 images per block bound
            # a decoding task's memory and what a retry has to redo.
            blocks = max(min(len(items), 4 * num_workers), -(-len(items) // 256))
            ds = (
                ray.data.from_items(items, override_num_blocks=blocks)
                .map(_decode_row, fn_kwargs={"root": str(root), "options": read_options})
                .map_batches(
                    _Segmenter,
                    fn_constructor_kwargs={"factory": factory, "root": str(root), "out": str(out),
                                           "overlays": overlays},
                    batch_size=batch_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=num_workers),
                    num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker,
                )
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                records = [json.loads(r) for r in batch["record"]]
                journal.append(records)
                bar.update(len(records))
        # Counted from the journal, not the stream, in which a rerun batch may appear twice.
        status = [journal.records.get(f.as_posix(), {}).get("status") for f in todo]
        ok = status.count("ok")
        failed = len(todo) - ok + len(unreadable)
    finally:
        bar.close()
        journal.finalize()
        if started:
            ray.shutdown()
    summary = RunSummary(len(files) + len(unreadable), ok, failed, len(files) - len(todo),
                         time.perf_counter() - t_start, out)
    write_run_info(out, summary.run_info(batch_size, settings))
    return summary
