"""Export, parity against torch fp32, and time, on one card: the check to run on a new GPU.

    python -m tools.gpu_check [--out DIR] [--skip-vit-h] [--keypoints topdown_heatmap] [--gdino]

For the tiny bundle and a ViT-H-sized bundle of seeded random weights (speed and the export path
do not depend on the values): ``cp-export onnx`` (ViT-H with external data), then each engine
that imports here against the torch fp32 engine on the CPU, with the parity check ``cp-export``
runs (per-graph max logit difference on random and recorded real calls, final masks):
torch on CUDA, ONNX Runtime (CPU EP, or CUDA EP with onnxruntime-gpu), and TensorRT fp32 and fp16
when ``tensorrt`` imports. Prints one table; writes ``gpu_check.json``. Every step is timed and
a failing step is a row with its error, so the table always comes out.

``--gdino`` adds the paper's detector at production size: the tiny SAM with a seeded random
Grounding DINO of the public Swin-T model's shape (BERT-base text encoder, 900 queries) on 800 px
images (needs the ``gdino`` extra). Community reports call its TensorRT export fragile; the rows
record what happens, failures included. Budget: under 10 minutes on an H100/H200 (ViT-H export
1-2 min, its ONNX Runtime CPU parity 2-3 min).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from cp_bench.results import write_json
from cp_bench.speed import run_ours, sync
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.engines.trt import TensorRTEngine
from cp_deploy.models.build import init_bundle
from cp_deploy.models.registry import keypoint_family
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export.onnx import export_onnx, sample_inputs
from export.parity import Tolerance, check_parity, synthetic_images
from export.trt import build_trt

# A random detector scores near its prior; threshold 0 with at least one instance exercises
# every stage on every image.
PROMPT = {"score_threshold": 0.0, "min_instances": 1, "max_instances": 3}


def _time_stages(engine, feeds: dict[str, dict[str, torch.Tensor]], repeat: int = 5) -> dict[str, float]:
    """ms per call of the image-level stages on ``feeds`` (sample_inputs: batch 2, 3 instances),
    input copies to the device included."""
    calls = {"encode": lambda: engine.encode(*feeds["encoder"].values()),
             "detect": lambda: engine.detect(*feeds["detector"].values()),
             "keypoints": lambda: engine.keypoints(*feeds["keypoints"].values())}
    out = {}
    for stage, call in calls.items():
        call()
        sync(engine.device.type)
        t0 = time.perf_counter()
        for _ in range(repeat):
            call()
        sync(engine.device.type)
        out[stage] = round((time.perf_counter() - t0) * 1000 / repeat, 2)
    return out


def check_bundle(name: str, bundle, out: Path, rows: list[dict], n_images: int) -> None:
    cpu = TorchEngine(bundle, device="cpu")
    images = synthetic_images(n_images, seed=3)
    random_inputs = sample_inputs(bundle, cpu.models, batch=2, instances=3, points=10, seed=1)

    def row(engine_name: str, precision: str, make, random_run=None) -> None:
        t0 = time.perf_counter()
        r = {"bundle": name, "engine": engine_name, "precision": precision}
        try:
            engine = make()
            tol = Tolerance.for_precision(precision)
            rep = check_parity(bundle, cpu.models, cpu, engine, images, tol, random_inputs=random_inputs,
                               run_graph=random_run(engine) if random_run else None)
            worst = max(max(d.values()) / max(1.0, rep.scale[g]) for g, d in rep.graphs.items())
            r.update(max_rel_logit_diff=worst, pixels_equal=rep.masks["pixel_agreement_min"],
                     dice_min=rep.masks["dice_min"], passed=not rep.failures, failures=rep.failures,
                     ms_per_image=run_ours(CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum")),
                                           images * 2, 4, engine.device.type)["ms_per_image"],
                     stage_ms=_time_stages(engine, random_inputs))
        except Exception as e:  # a row with the error; the other rows still run
            r.update(passed=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()
        r["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)

    onnx_dir = out / f"{name}-onnx"
    t0 = time.perf_counter()
    export_onnx(bundle, cpu.models, onnx_dir, progress=True)
    rows.append({"bundle": name, "engine": "cp-export onnx", "precision": "fp32", "passed": True,
                 "seconds": round(time.perf_counter() - t0, 1)})
    row("torch-cpu (reference timing)", "fp32", lambda: cpu)
    if torch.cuda.is_available():
        row("torch-cuda", "fp32", lambda: TorchEngine(bundle, device="cuda"))

    import onnxruntime

    ort_dev = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    row(f"onnxruntime-{ort_dev}", "fp32", lambda: OnnxRuntimeEngine(bundle, device=ort_dev, onnx_dir=onnx_dir),
        lambda e: e.run)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        rows.append({"bundle": name, "engine": "trt", "passed": None, "error": "tensorrt does not import here"})
        return

    for fp16 in (False, True):
        prec = "fp16" if fp16 else "fp32"
        trt_dir = out / f"{name}-trt-{prec}"

        def make(trt_dir=trt_dir, fp16=fp16):
            build_trt(onnx_dir, trt_dir, fp16=fp16, max_batch=4, max_instances=16)
            return TensorRTEngine(bundle, engine_dir=trt_dir)

        row("trt", prec, make, lambda e: e.run)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/cp-gpu-check", help="work folder (graphs, engines, gpu_check.json)")
    ap.add_argument("--skip-vit-h", action="store_true", help="only the tiny bundle")
    ap.add_argument("--images", type=int, default=4, help="synthetic images per parity check")
    ap.add_argument("--keypoints", default="embedding_heatmap", choices=["embedding_heatmap", "topdown_heatmap"],
                    help="keypoint net: topdown_heatmap is HRNet-W32 on 256-pixel crops in the ViT-H and Grounding "
                         "DINO bundles (w18-small on 64-pixel crops in the tiny one)")
    ap.add_argument("--gdino", action="store_true", help="also Grounding DINO (Swin-T size, random) as detector")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    bundles = [("tiny", "tiny", None)] + ([] if args.skip_vit_h else [("vit_h-random", "vit_h", None)])
    if args.gdino:
        bundles.append(("gdino-swin-t-random", "tiny", {}))
    for name, arch, gdino in bundles:
        t0 = time.perf_counter()
        keypoints = None
        if args.keypoints == "topdown_heatmap":
            big = arch == "vit_h" or gdino is not None
            family = keypoint_family("topdown_heatmap")
            cfg = family.default_config() if big else family.default_config("hrnet_w18_small", 64, 32)
            keypoints, name = (family.name, cfg), f"{name}+{cfg['backbone']}"
        bundle = init_bundle(out / f"{name}-bundle", arch, seed=0, prompt=PROMPT, keypoints=keypoints, gdino=gdino)
        print(f"{name}: bundle written in {time.perf_counter() - t0:.1f} s", flush=True)
        check_bundle(name, bundle, out, rows, args.images)
    write_json(out / "gpu_check.json", {"device": device, "torch": torch.__version__, "rows": rows})
    print(f"\n{device}, torch {torch.__version__}")
    print("| bundle | engine | precision | max rel logit diff | pixels equal (min) | Dice (min) | ms/image | "
          "encode/detect/keypoints ms | passed | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def f(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(f"| {r['bundle']} | {r['engine']} | {r.get('precision', '-')} | {f('max_rel_logit_diff', '.2e')} | "
              f"{f('pixels_equal', '.4%')} | {f('dice_min', '.5f')} | {f('ms_per_image', '.1f')} | "
              f"{'/'.join(str(v) for v in r['stage_ms'].values()) if r.get('stage_ms') else '-'} | "
              f"{r.get('passed')} | {r.get('seconds', '-')} |" + (f" {r['error']}" if r.get("error") else ""))


if __name__ == "__main__":
    main()
