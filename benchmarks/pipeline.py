"""Throughput, latency, per-stage time and peak memory of the curriculum pipeline, and the naive
reference in the same process.

    python -m benchmarks.pipeline [--bundle B] [--engine torch|onnxruntime|trt] [--graphs DIR]
        [--device cpu|cuda] [--batch-size N] [--images N] [--image-dir DIR] [--reference] [--json F]

*Ours*: ``CurriculumPipeline.predict`` on batches of ``--batch-size`` decoded images (one
encoder pass per image, one decoder call per pass for all instances of a batch), on the chosen
engine. *Reference* (``--reference``): the paper-style loop on ``segment_anything.SamPredictor``
with the same weights, fp32, batch 1: the same detector and keypoint net, then ``set_image`` and
``predict`` for the box pass, and ``set_image`` again and ``predict`` for the points+mask pass, one
instance at a time. (For a LiteMedSAM bundle SamPredictor applies SAM's mean/std instead of
min-max scaling; that changes the values, not the cost.) Both run on the same images, after a
warm-up. Output: a short table, and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from cp_deploy.bundle import load_bundle
from cp_deploy.engines import create_engine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.io import discover_images, read_image
from cp_deploy.pipeline import STAGES, CurriculumPipeline, PipelineOptions
from cp_deploy.preprocess import Frame, to_rgb_uint8


def reference_curriculum(pipe: CurriculumPipeline, p_box: SamPredictor, p_ref: SamPredictor, image: np.ndarray) -> int:
    """The naive curriculum: ``set_image`` for the box pass and again for the fine pass, one
    ``predict`` per instance; detector and keypoints are ours (they are not what differs)."""
    p_box.set_image(image)
    frame = Frame.for_image(image.shape[:2], pipe.sam_cfg.image_size)
    (boxes, _), = pipe.detect([image], p_box.features, [frame])
    coarse = [p_box.predict(box=b.numpy(), multimask_output=False)[2] for b in boxes]
    idx = torch.zeros(len(boxes), dtype=torch.long)
    points = pipe.keypoints([image], boxes, idx, p_box.features, [frame])[0] if len(boxes) else []
    p_ref.set_image(image)
    for low, pts in zip(coarse, points):
        p_ref.predict(point_coords=pts.numpy(), point_labels=np.zeros(len(pts)), mask_input=low,
                      multimask_output=False)
    return len(boxes)


def load_images(image_dir: str | None, n: int) -> list[np.ndarray]:
    """``n`` RGB images: cycled from ``image_dir``, or synthetic when it is not given."""
    if image_dir:
        files = discover_images(image_dir)
        pool = [to_rgb_uint8(read_image(Path(image_dir) / p)) for p in files[:n]]
    else:
        from export.parity import synthetic_images

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
        "stage_ms_per_image": {s: round(float(np.mean(v)), 2) for s, v in stage_ms.items()},
        "instances_per_image": round(n_inst / len(images), 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def run_reference(pipe: CurriculumPipeline, models, images: list[np.ndarray], device: str) -> dict:
    # Sam's own pixel_mean/std buffers decide SamPredictor's device, so the wrappers move too.
    sam_box = Sam(models.image_encoder, models.box.prompt_encoder, models.box.mask_decoder).to(device).eval()
    sam_ref = Sam(models.image_encoder, models.refine.prompt_encoder, models.refine.mask_decoder).to(device).eval()
    p_box, p_ref = SamPredictor(sam_box), SamPredictor(sam_ref)
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "trt"], help="engine to time")
    ap.add_argument("--graphs", default=None, help="exported graphs for onnxruntime/trt (default BUNDLE/onnx|trt)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="torch engine precision")
    ap.add_argument("--compile", action="store_true", help="torch engine: torch.compile the encoder")
    ap.add_argument("--images", type=int, default=15, help="images to time (cycled from --image-dir)")
    ap.add_argument("--image-dir", default="examples/images", help="folder of images ('' for synthetic ones)")
    ap.add_argument("--reference", action="store_true", help="also time the SamPredictor reference, same images")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of torch / ONNX Runtime (0: default)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    engine = create_engine(args.engine, bundle, device=args.device, graphs=args.graphs, threads=args.threads,
                           precision=args.precision, compile=args.compile)
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum"))
    images = load_images(args.image_dir, args.images)
    ours = run_ours(pipe, images, args.batch_size, args.device)
    result = {
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "engine": args.engine, "precision": args.precision, "compile": args.compile, "bundle": str(bundle.root),
        "sam": bundle.sam_arch, "batch_size": args.batch_size,
        "images": len(images), "image_dir": args.image_dir or "synthetic", "ours": ours,
    }
    if args.reference:
        # segment-anything as shipped: fresh modules (the engine's attention is swapped for SDPA).
        ref_engine = TorchEngine(bundle, device=args.device, sdpa=False)
        ref_pipe = CurriculumPipeline(bundle, ref_engine, PipelineOptions(prompts="curriculum"))
        result["reference"] = run_reference(ref_pipe, ref_engine.models, images, args.device)
        result["speedup"] = round(ours["images_per_s"] / result["reference"]["images_per_s"], 2)
    print(f"{result['engine']} on {result['device']}, {bundle.sam_arch}, batch {args.batch_size}, "
          f"{len(images)} images")
    print("| stage | ms per image |\n| --- | --- |")
    for s, v in ours["stage_ms_per_image"].items():
        print(f"| {s} | {v} |")
    print(f"ours: {ours['images_per_s']} images/s ({ours['ms_per_image']} ms/image), batch latency p50 "
          f"{ours['batch_latency_ms_p50']} ms / p95 {ours['batch_latency_ms_p95']} ms, peak memory "
          f"{ours['peak_memory_mb']} MiB, {ours['instances_per_image']} instances/image")
    if args.reference:
        r = result["reference"]
        print(f"reference (SamPredictor, fp32, batch 1, set_image per pass): {r['images_per_s']} images/s "
              f"({r['ms_per_image']} ms/image); ours / reference = {result['speedup']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
