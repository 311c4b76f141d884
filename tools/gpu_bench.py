"""The GPU speed table: the curriculum pipeline with a ViT-H-sized SAM against the naive
SamPredictor reference, in one process, plus bf16 parity against fp32.

    python -m tools.gpu_bench [--out DIR] [--images 32] [--no-compile]
    python -m tools.gpu_bench --arch tiny --device cpu --images 4 --no-compile   # a smoke run

The ViT-H bundle has seeded random weights (speed does not depend on the values), the default
bundle's EfficientNet-Lite0 detector (reads the image, so it overlaps the encoder on a side
stream) and an embedding keypoint head. Rows: the reference (fp32, batch 1, ``set_image`` per
pass), ours fp32 batch 1, ours bf16 batch 8, ours bf16 batch 8 compiled. Prints one table and
writes ``gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cp_bench.results import write_json
from cp_bench.speed import SpeedConfig, measure_speed, summary
from cp_deploy.bundle import default_bundle_path, derive_bundle, load_bundle, read_spec
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.models.build import init_bundle
from cp_deploy.models.weights import read_state_dict
from export.parity import Tolerance, check_parity, synthetic_images


def random_bundle(out: Path, arch: str = "vit_h") -> Path:
    """A SAM bundle of random weights with the shipped bundle's image-reading detector."""
    bundle = init_bundle(out, arch, seed=0, prompt={"score_threshold": 0.0, "min_instances": 1,
                                                       "max_instances": 3})
    shipped = load_bundle(default_bundle_path())
    entry = read_spec(shipped)["detector"]
    # Derived in place: the SAM and keypoint files stay where they are; the detector's fp16
    # weights are stored as they are shipped (fp16).
    derive_bundle(bundle, out, {"detector": (entry, read_state_dict(shipped.detector.file))})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/cp-gpu-bench", help="work folder")
    ap.add_argument("--images", type=int, default=32, help="images per configuration")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--arch", default="vit_h", help="SAM size (tiny: a quick smoke run of this script)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("tools.gpu_bench needs a CUDA GPU (or --device cpu --arch tiny for a smoke run)")
    out = Path(args.out)
    t0 = time.perf_counter()
    bdir = random_bundle(out / f"{args.arch}-random", args.arch)
    print(f"bundle written in {time.perf_counter() - t0:.0f} s", flush=True)
    common = {"bundle": str(bdir), "device": args.device, "images": args.images, "image_dir": ""}
    runs = [("fp32, batch 1, + reference", {"batch_size": 1, "reference": True}),
            ("bf16, batch 8", {"batch_size": 8, "precision": "bf16"})]
    if not args.no_compile:
        runs.append(("bf16, batch 8, compiled", {"batch_size": 8, "precision": "bf16", "compile": True}))
    rows = []
    for name, extra in runs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = measure_speed(SpeedConfig(**common, **extra))
        print(summary(r))
        write_json(out / f"bench-{len(rows)}.json", r)
        rows.append({"config": name, **r, "seconds": round(time.perf_counter() - t0, 1)})

    bundle = load_bundle(bdir)
    fp32, bf16 = TorchEngine(bundle, device=args.device), TorchEngine(bundle, device=args.device, precision="bf16")
    rep = check_parity(bundle, fp32.models, fp32, bf16, synthetic_images(8, seed=5), Tolerance.for_precision("bf16"))
    parity = rep.to_json()
    print(rep.table())
    ref = rows[0]["reference"]
    device = rows[0]["device"]
    write_json(out / "gpu_bench.json", {"device": device, "rows": rows, "bf16_parity": parity})
    print(f"\n{device}, torch {torch.__version__}, {args.arch} random weights, {args.images} images")
    print("| config | images/s | ms/image | batch p50 ms | encode | detect | box | keypoints | refine | "
          "peak GiB | x reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| reference (SamPredictor fp32, batch 1) | {ref['images_per_s']} | {ref['ms_per_image']} | "
          f"{ref['latency_ms_p50']} | | | | | | | 1.0 |")
    for r in rows:
        o, st = r["ours"], r["ours"]["stage_ms_per_image"]
        print(f"| {r['config']} | {o['images_per_s']} | {o['ms_per_image']} | {o['batch_latency_ms_p50']} | "
              f"{st['encode']} | {st['detect']} | {st['box']} | {st['keypoints']} | {st['refine']} | "
              f"{o['peak_memory_mb'] / 1024:.2f} | {o['images_per_s'] / ref['images_per_s']:.1f} |")
    m = parity["masks"]
    print(f"bf16 vs fp32: passed {parity['passed']}, pixels equal min {100 * m['pixel_agreement_min']:.3f}%, "
          f"Dice min {m['dice_min']:.4f}; {'; '.join(parity['failures'])}")


if __name__ == "__main__":
    main()
