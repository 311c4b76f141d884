"""Throughput, latency, per-stage time and peak memory of the curriculum pipeline, and the naive
reference in the same process.

*Ours*: ``CurriculumPipeline.predict`` on batches of decoded images (one encoder pass per image,
one decoder call per pass for all instances of a batch), on the chosen engine. *Reference*: the
paper-style loop on ``segment_anything.SamPredictor`` with the same weights, fp32, batch 1: the
same detector and keypoint net, then ``set_image`` and ``predict`` for the box pass, and
``set_image`` again and ``predict`` for the points+mask pass, one instance at a time. (For a
LiteMedSAM bundle SamPredictor applies SAM's mean/std instead of min-max scaling; that changes
the values, not the cost.) Both run on the same images, after a warm-up.

*Latency* (``SpeedConfig.latency``, ``cp-bench speed --latency``): ours at batch 1, one image per
call, each call's wall time with the device synchronised at its end; p50, p95 and mean per image
and each stage's p50 (the stage timers synchronise the device too).

*End to end* (``SpeedConfig.end_to_end``, ``cp-bench speed --end-to-end``): from image files to
written masks. Ours is ``cp-deploy batch``'s local executor (decoding threads, model workers in
the arrangement ``--model-workers`` picks, the writer thread), its wall time including the models'
load; the reference reads each file, runs the loop above and writes the union of its masks as a
PNG. Both get the same files: ``--images`` copies cycled from ``--image-dir``.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from cp_deploy.bundle import Bundle, load_bundle
from cp_deploy.engines import create_engine
from cp_deploy.engines.base import Engine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.executors import PipelineFactory, graph_folder, graph_precisions
from cp_deploy.executors.local import run_folder
from cp_deploy.files import discover_images, read_image, write_mask
from cp_deploy.models.build import Models
from cp_deploy.pipeline import STAGES, CurriculumPipeline, PipelineOptions
from cp_deploy.preprocess import to_rgb_uint8
from export.parity import synthetic_images


@dataclass
class SpeedConfig:
    """What to time: the bundle, engine and its settings, and the images."""

    bundle: str | None = None
    engine: str = "torch"
    graphs: str | None = None
    device: str = "cpu"
    batch_size: int = 1
    precision: str = "fp32"
    compile: bool = False
    images: int = 15
    image_dir: str = "examples/images"  # "" for synthetic images
    reference: bool = False
    threads: int = 0
    latency: bool = False
    end_to_end: bool = False
    model_workers: int | str = "auto"  # end to end: cp-deploy batch's --model-workers
    # torch engine only (see cp_deploy.engines.torch): None keeps the engine's defaults.
    attention: str | None = None
    trim_windows: bool = False
    decoder_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.latency and self.batch_size != 1:
            raise ValueError("latency is timed at batch 1, one image per call; leave the batch size at 1")
        if self.end_to_end and not self.image_dir:
            raise ValueError("end to end reads image files; give an image folder, not synthetic images")
        if self.engine != "torch" and (self.attention or self.trim_windows or self.decoder_buckets):
            raise ValueError(f"attention, trim_windows and decoder_buckets are the torch engine's options, "
                             f"not {self.engine}'s")


def reference_curriculum(pipe: CurriculumPipeline, p_box: SamPredictor, p_ref: SamPredictor,
                         image: np.ndarray) -> np.ndarray:
    """The naive curriculum: ``set_image`` for the box pass and again for the fine pass, one
    ``predict`` per instance; detector and keypoints are ours (they are not what differs).
    Returns the union of the fine masks."""
    p_box.set_image(image)
    (boxes, _), = pipe.detect([image], embeddings=p_box.features)
    coarse = [p_box.predict(box=b.numpy(), multimask_output=False)[2] for b in boxes]
    points = pipe.keypoints([image], boxes, embeddings=p_box.features)[0] if len(boxes) else []
    p_ref.set_image(image)
    union = np.zeros(image.shape[:2], bool)
    for low, pts in zip(coarse, points):
        masks, _, _ = p_ref.predict(point_coords=pts.numpy(), point_labels=np.zeros(len(pts)), mask_input=low,
                                    multimask_output=False)
        union |= masks[0]
    return union


def load_images(image_dir: str | None, n: int) -> list[np.ndarray]:
    """``n`` RGB images: cycled from ``image_dir``, or synthetic when it is not given."""
    if image_dir:
        files = discover_images(image_dir)
        pool = [to_rgb_uint8(read_image(Path(image_dir) / p)) for p in files[:n]]
    else:
        pool = synthetic_images(min(n, 8))
    return [pool[i % len(pool)] for i in range(n)]


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer reads its end (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(pipe: CurriculumPipeline, images: list[np.ndarray], batch_size: int, device: str) -> dict:
    """Time ``pipe`` on ``images`` in batches of ``batch_size``, after a warm-up: throughput, each
    batch's wall time (device synchronised at its end) and each stage's time per image."""
    # Warm-up: allocations and kernel choice; on CUDA, torch.compile's CUDA graphs are recorded
    # on a later call than the first, so three calls keep the recording out of the timed loop.
    for _ in range(3 if device.startswith("cuda") else 1):
        pipe.predict(images[:batch_size])
        sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stage_ms = {s: [] for s in STAGES}
    batch_ms, n_inst = [], 0
    t_start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        t0 = time.perf_counter()
        results = pipe.predict(images[i : i + batch_size])
        sync(device)
        batch_ms.append((time.perf_counter() - t0) * 1000)
        n_inst += sum(len(r.boxes) for r in results)
        for s in STAGES:
            stage_ms[s].append(results[0].timings_ms[s])
    total = time.perf_counter() - t_start
    return {
        "images_per_s": round(len(images) / total, 3),
        "ms_per_image": round(total * 1000 / len(images), 2),
        "batch_latency_ms_p50": round(float(np.percentile(batch_ms, 50)), 2),
        "batch_latency_ms_p95": round(float(np.percentile(batch_ms, 95)), 2),
        "batch_latency_ms_mean": round(float(np.mean(batch_ms)), 2),
        "stage_ms_per_image": {s: round(float(np.mean(v)), 2) for s, v in stage_ms.items()},
        "stage_ms_p50": {s: round(float(np.percentile(v, 50)), 2) for s, v in stage_ms.items()},
        "instances_per_image": round(n_inst / len(images), 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def latency_of(ours: dict, images: int) -> dict:
    """Per-image latency from a batch-1 :func:`run_ours` result: p50, p95 and mean per image, and
    each stage's p50."""
    return {"images": images, "latency_ms_p50": ours["batch_latency_ms_p50"],
            "latency_ms_p95": ours["batch_latency_ms_p95"], "latency_ms_mean": ours["batch_latency_ms_mean"],
            "stage_ms_p50": ours["stage_ms_p50"]}


def reference_predictors(models: Models, device: str) -> tuple[SamPredictor, SamPredictor]:
    """SamPredictors of the box head and the refine head around the same image encoder."""
    # Sam's own pixel_mean/std buffers decide SamPredictor's device, so the wrappers move too.
    sam_box = Sam(models.image_encoder, models.box.prompt_encoder, models.box.mask_decoder).to(device).eval()
    sam_ref = Sam(models.image_encoder, models.refine.prompt_encoder, models.refine.mask_decoder).to(device).eval()
    return SamPredictor(sam_box), SamPredictor(sam_ref)


def run_reference(pipe: CurriculumPipeline, models: Models, images: list[np.ndarray], device: str) -> dict:
    """Time :func:`reference_curriculum` on ``images``, one at a time, after a warm-up."""
    p_box, p_ref = reference_predictors(models, device)
    lat = []
    with torch.inference_mode():
        reference_curriculum(pipe, p_box, p_ref, images[0])  # warm-up
        t_start = time.perf_counter()
        for im in images:
            t0 = time.perf_counter()
            reference_curriculum(pipe, p_box, p_ref, im)
            sync(device)
            lat.append((time.perf_counter() - t0) * 1000)
        total = time.perf_counter() - t_start
    return {"images_per_s": round(len(images) / total, 3), "ms_per_image": round(total * 1000 / len(images), 2),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 2)}


def input_files(image_dir: str, n: int, folder: Path) -> list[Path]:
    """``n`` image files in ``folder``: the images of ``image_dir`` copied in turn, each under its own name."""
    pool = [Path(image_dir) / p for p in discover_images(image_dir)]
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i:05d}_{pool[i % len(pool)].name}" for i in range(n)]
    for i, f in enumerate(files):
        shutil.copyfile(pool[i % len(pool)], f)
    return files


def _files_rate(n: int, wall: float) -> dict:
    return {"images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 3)}


def run_ours_files(cfg: SpeedConfig, files: list[Path], out: Path) -> dict:
    """``cp-deploy batch``'s local executor from the files to written masks, as the CLI sets it up
    (two decoding threads, ``cfg.model_workers``); wall time includes loading the models."""
    factory = PipelineFactory(cfg.bundle, cfg.engine, cfg.device, PipelineOptions(prompts="curriculum"),
                              cfg.threads, cfg.graphs, cfg.precision, cfg.compile)
    t0 = time.perf_counter()
    summary = run_folder(factory, files[0].parent, out, batch_size=cfg.batch_size, workers=2, progress=False,
                         model_workers=cfg.model_workers)
    wall = time.perf_counter() - t0
    if summary.failed or summary.ok != len(files):
        raise RuntimeError(f"end to end: {summary.line()}")
    arrangement = json.loads((out / "run.json").read_text())["provenance"]["arrangement"]
    return {**_files_rate(len(files), wall), "arrangement": arrangement}


def run_reference_files(bundle: Bundle, files: list[Path], out: Path, device: str) -> dict:
    """The reference from the files to written masks: read, :func:`reference_curriculum`, write a
    PNG, one file at a time; wall time includes building its models."""
    t0 = time.perf_counter()
    engine = TorchEngine(bundle, device=device, attention="sam")  # segment-anything's own attention
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum"))
    p_box, p_ref = reference_predictors(engine.models, device)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for f in files:
            mask = reference_curriculum(pipe, p_box, p_ref, to_rgb_uint8(read_image(f)))
            write_mask(out / f"{f.stem}.png", mask)
    return _files_rate(len(files), time.perf_counter() - t0)


def measure_end_to_end(cfg: SpeedConfig, bundle: Bundle) -> dict:
    """Ours (and with ``cfg.reference`` the reference) from files to written masks, in this process."""
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        files = input_files(cfg.image_dir, cfg.images, Path(tmp) / "in")
        result = {"ours": run_ours_files(cfg, files, Path(tmp) / "ours")}
        if cfg.reference:
            result["reference"] = run_reference_files(bundle, files, Path(tmp) / "ref", cfg.device)
            result["speedup"] = round(result["ours"]["images_per_s"] / result["reference"]["images_per_s"], 2)
    return result


def make_engine(cfg: SpeedConfig, bundle: Bundle) -> Engine:
    """The engine ``cfg`` names; the torch engine with its GPU options."""
    if cfg.engine == "torch":
        return TorchEngine(bundle, device=cfg.device, precision=cfg.precision, attention=cfg.attention,
                           compile=cfg.compile, trim_windows=cfg.trim_windows, decoder_buckets=cfg.decoder_buckets)
    return create_engine(cfg.engine, bundle, device=cfg.device, graphs=cfg.graphs, threads=cfg.threads,
                         precision=cfg.precision, compile=cfg.compile)


def graphs_run(cfg: SpeedConfig, bundle: Bundle) -> dict:
    """The graph folder a graph engine runs and each graph's precision from its manifest (both
    ``None`` for torch, whose precision is ``cfg.precision``)."""
    folder = graph_folder(cfg.engine, cfg.graphs, bundle)
    return {"graphs": str(folder) if folder else None, "graph_precisions": graph_precisions(folder)}


def device_name(cfg: SpeedConfig) -> str:
    if cfg.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_speed(cfg: SpeedConfig, engine: Engine | None = None) -> dict:
    """Time ours (per-image latency at batch 1 with ``cfg.latency``; and with ``cfg.reference``
    the SamPredictor loop) on the same images. ``engine``: one already made for ``cfg`` (a
    compiled one keeps its compiled graphs across calls)."""
    if cfg.end_to_end:
        bundle = load_bundle(cfg.bundle)
        return {"device": device_name(cfg), "engine": cfg.engine, "precision": cfg.precision,
                **graphs_run(cfg, bundle), "bundle": str(bundle.root), "sam": bundle.sam_arch,
                "batch_size": cfg.batch_size, "images": cfg.images, "image_dir": cfg.image_dir,
                "end_to_end": measure_end_to_end(cfg, bundle)}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bundle = load_bundle(cfg.bundle)
    engine = engine or make_engine(cfg, bundle)
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum"))
    images = load_images(cfg.image_dir, cfg.images)
    result = {
        "device": device_name(cfg),
        "engine": cfg.engine, "precision": cfg.precision, "compile": cfg.compile, **graphs_run(cfg, bundle),
        "bundle": str(bundle.root),
        "sam": bundle.sam_arch, "batch_size": cfg.batch_size,
        "images": len(images), "image_dir": cfg.image_dir or "synthetic",
    }
    if isinstance(engine, TorchEngine):
        result["torch_options"] = {"attention": engine.attention, "trim_windows": cfg.trim_windows,
                                   "decoder_buckets": list(cfg.decoder_buckets or [])}
    result["ours"] = run_ours(pipe, images, cfg.batch_size, cfg.device)
    if cfg.latency:
        result["latency"] = latency_of(result["ours"], len(images))
    if cfg.reference:
        # segment-anything as shipped: fresh modules with their own attention.
        ref_engine = TorchEngine(bundle, device=cfg.device, attention="sam")
        ref_pipe = CurriculumPipeline(bundle, ref_engine, PipelineOptions(prompts="curriculum"))
        result["reference"] = run_reference(ref_pipe, ref_engine.models, images, cfg.device)
        result["speedup"] = round(result["ours"]["images_per_s"] / result["reference"]["images_per_s"], 2)
    return result


def summary(result: dict) -> str:
    """The per-stage table and the throughput lines of one :func:`measure_speed` result."""
    if "end_to_end" in result:
        e2e = result["end_to_end"]
        ours, arr = e2e["ours"], e2e["ours"]["arrangement"]
        lines = [f"end to end, files to written masks: {result['engine']} on {result['device']}, {result['sam']}, "
                 f"{ours['images']} images from {result['image_dir']}",
                 f"ours: {ours['images_per_s']} images/s ({ours['seconds']} s, models' load included; "
                 f"{arr['model_workers']} model workers x {arr['threads_per_worker']} threads)"]
        if "reference" in e2e:
            r = e2e["reference"]
            lines.append(f"reference (SamPredictor loop, reading and writing the same files): {r['images_per_s']} "
                         f"images/s ({r['seconds']} s); ours / reference = {e2e['speedup']}x")
        return "\n".join(lines)
    ours = result["ours"]
    lines = [f"{result['engine']} on {result['device']}, {result['sam']}, batch {result['batch_size']}, "
             f"{result['images']} images", "| stage | ms per image |\n| --- | --- |"]
    lines += [f"| {s} | {v} |" for s, v in ours["stage_ms_per_image"].items()]
    lines.append(f"ours: {ours['images_per_s']} images/s ({ours['ms_per_image']} ms/image), batch latency p50 "
                 f"{ours['batch_latency_ms_p50']} ms / p95 {ours['batch_latency_ms_p95']} ms, peak memory "
                 f"{ours['peak_memory_mb']} MiB, {ours['instances_per_image']} instances/image")
    if "latency" in result:
        lat = result["latency"]
        lines.append(f"latency, batch 1, {lat['images']} images: p50 {lat['latency_ms_p50']} ms, p95 "
                     f"{lat['latency_ms_p95']} ms, mean {lat['latency_ms_mean']} ms per image")
    if "reference" in result:
        r = result["reference"]
        lines.append(f"reference (SamPredictor, fp32, batch 1, set_image per pass): {r['images_per_s']} images/s "
                     f"({r['ms_per_image']} ms/image); ours / reference = {result['speedup']}x")
    return "\n".join(lines)
