"""What ``--executor ray`` costs against the local executor on the same images, on one machine.

    python -m tools.ray_overhead [--bundle B] [--images examples/images] [--sizes 10 40] [--threads 1]

For each size N the images are repeated to N files; the local executor and Ray (one worker with
the same torch threads, then ``--workers`` workers) segment them into fresh folders. The fixed
cost (cluster start, actor start and bundle load) and the marginal cost per image are separated
by the two sizes: marginal = (t(N2) - t(N1)) / (N2 - N1). Outputs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cp_bench.results import write_json
from cp_deploy.executors import PipelineFactory
from cp_deploy.executors.local import run_folder
from cp_deploy.executors.ray import run_folder_ray
from cp_deploy.files import discover_images


def _inputs(src: Path, n: int, dst: Path) -> Path:
    files = discover_images(src)
    dst.mkdir(parents=True)
    for i in range(n):
        f = files[i % len(files)]
        shutil.copy(src / f, dst / f"{i:05d}{f.suffix}")
    return dst


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "masks").rglob("*.png"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--images", default="examples/images", help="folder of images to repeat")
    ap.add_argument("--sizes", type=int, nargs=2, default=[10, 40], help="two image counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local run and of each Ray worker")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of the scaled run")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args()
    import ray

    torch.set_num_threads(args.threads)
    factory = PipelineFactory(args.bundle, threads=args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cp-ray-bench-"))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = {"ray_init_s": round(time.perf_counter() - t0, 2)}
    pipeline = factory()
    for n in args.sizes:
        inp = _inputs(Path(args.images), n, tmp / f"in{n}")
        t0 = time.perf_counter()
        run_folder(pipeline, inp, tmp / f"local{n}", progress=False)
        rows[f"local_{n}"] = round(time.perf_counter() - t0, 2)
        for w in (1, args.workers):
            t0 = time.perf_counter()
            # Fractional CPUs keep room for the decoding tasks when the workers fill the cluster.
            run_folder_ray(factory, inp, tmp / f"ray{w}_{n}", num_workers=w,
                           cpus_per_worker=min(1.0, (args.cpus - 1) / w) if w > 1 else 1.0, progress=False)
            rows[f"ray{w}_{n}"] = round(time.perf_counter() - t0, 2)
            assert _masks(tmp / f"ray{w}_{n}") == _masks(tmp / f"local{n}"), "ray and local masks differ"
    n1, n2 = args.sizes
    for key in ("local", "ray1", f"ray{args.workers}"):
        rows[f"{key}_ms_per_image_marginal"] = round((rows[f"{key}_{n2}"] - rows[f"{key}_{n1}"]) / (n2 - n1) * 1000, 1)
        rows[f"{key}_fixed_s"] = round(rows[f"{key}_{n1}"] - n1 * rows[f"{key}_ms_per_image_marginal"] / 1000, 2)
    ray.shutdown()
    shutil.rmtree(tmp)
    print(json.dumps(rows, indent=1))
    write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    main()
