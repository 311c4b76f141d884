"""Throughput and per-stage latency of the curriculum pipeline against a naive reference.

    python benchmarks/pipeline.py [--bundle B] [--images examples/images] [--repeat 3] [--device cpu]

*Ours*: ``CurriculumPipeline.predict`` (one encoder pass per image, batched decoders).
*Reference*: the paper-style loop on ``segment_anything.SamPredictor`` with the same weights:
the same detector and keypoint net, then ``set_image`` and ``predict`` for the box pass, and
``set_image`` again and ``predict`` for the points+mask pass, one instance at a time. (For a
LiteMedSAM bundle SamPredictor applies SAM's mean/std instead of min-max scaling; that changes
the values, not the cost.) Both run in the same process on the same images, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from cp_deploy.bundle import load_bundle
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--images", default="examples/images", help="folder of images")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the images")
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    engine = TorchEngine(bundle, device=args.device)
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum"))
    images = [to_rgb_uint8(read_image(Path(args.images) / p)) for p in discover_images(args.images)]
    pipe.predict(images[:1])  # warm-up

    stage_ms = {s: [] for s in STAGES}
    t0 = time.perf_counter()
    n_inst = 0
    for _ in range(args.repeat):
        for im in images:
            (r,) = pipe.predict([im])
            n_inst += len(r.boxes)
            for s in STAGES:
                stage_ms[s].append(r.timings_ms[s])
    ours_s = (time.perf_counter() - t0) / (args.repeat * len(images))

    m = engine.models
    sam_box = Sam(m.image_encoder, m.box.prompt_encoder, m.box.mask_decoder).eval()
    sam_ref = Sam(m.image_encoder, m.refine.prompt_encoder, m.refine.mask_decoder).eval()
    p_box, p_ref = SamPredictor(sam_box), SamPredictor(sam_ref)
    with torch.inference_mode():
        reference_curriculum(pipe, p_box, p_ref, images[0])  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for im in images:
                reference_curriculum(pipe, p_box, p_ref, im)
        ref_s = (time.perf_counter() - t0) / (args.repeat * len(images))
    result = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "bundle": str(bundle.root), "images": len(images), "repeat": args.repeat,
        "instances_per_image": n_inst / (args.repeat * len(images)),
        "stage_ms": {s: round(float(np.mean(v)), 2) for s, v in stage_ms.items()},
        "ours_ms_per_image": round(ours_s * 1000, 1), "ours_images_per_s": round(1 / ours_s, 3),
        "reference_ms_per_image": round(ref_s * 1000, 1), "reference_images_per_s": round(1 / ref_s, 3),
        "speedup": round(ref_s / ours_s, 2),
    }
    print("| stage | ms per image |\n| --- | --- |")
    for s, v in result["stage_ms"].items():
        print(f"| {s} | {v} |")
    print(f"\nours: {result['ours_ms_per_image']} ms/image ({result['ours_images_per_s']} images/s); "
          f"reference (SamPredictor, set_image per pass): {result['reference_ms_per_image']} ms/image; "
          f"speed-up {result['speedup']}x; {result['instances_per_image']:.2f} instances/image")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
