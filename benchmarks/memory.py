"""Peak memory of ``cp-deploy batch`` against the number of images.

Each run is a fresh process (``--child``) that segments N small synthetic PNGs with the seeded
tiny bundle, so the model's memory is the same in every run and what grows with N is the run's
own bookkeeping (listing, journal, records, progress). The child reports its peak resident set
(``VmHWM``) and samples its resident set as images finish.

    python -m benchmarks.memory --sizes 100 10000 --json benchmarks/results/memory_tiny.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def write_images(folder: Path, n: int, side: int = 48) -> None:
    """``n`` small PNGs (a bright disc on a dark background) in subfolders of 1000."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((side, side + 16, 3), 40, np.uint8)
        cx, cy = (int(v) for v in rng.integers(16, side - 16, 2))
        cv2.circle(img, (cx, cy), 10, (200, 120, 90), -1)
        sub = folder / f"part{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"img_{i:05d}.png"), img)


def child(n: int, work: Path) -> dict:
    """One measured run: images and bundle are made before the baseline is read."""
    from cp_deploy.cli import main as deploy_main
    from cp_deploy.models.build import init_bundle

    bundle = init_bundle(work / "bundle", "tiny", seed=0, prompt={"score_threshold": 0.05, "max_instances": 3})
    write_images(work / "in", n)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.wait(0.5):
            samples.append((round(time.perf_counter() - t0, 1), _status_kib("VmRSS")))

    before = _status_kib("VmRSS")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    rc = deploy_main(["batch", "--input", str(work / "in"), "--output", str(work / "out"),
                      "--bundle", str(bundle.root), "--no-progress"])
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    lines = (work / "out" / "results.jsonl").read_text().count("\n")
    return {"images": n, "exit_code": rc, "records": lines, "seconds": round(seconds, 1),
            "rss_before_run_mib": round(before / 1024, 1), "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
            "rss_samples_mib": [(t, round(k / 1024, 1)) for t, k in samples[:: max(1, len(samples) // 40)]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 10000], help="image counts, one process each")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(args.child, Path(tmp))))
        return 0
    runs = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", str(n)], check=True,
                             capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{n} images: exit {r['exit_code']}, {r['records']} records, {r['seconds']} s, "
              f"peak RSS {r['peak_rss_mib']} MiB (before the run {r['rss_before_run_mib']} MiB)")
    base = runs[0]["peak_rss_mib"]
    for r in runs[1:]:
        print(f"{r['images']} vs {runs[0]['images']} images: peak RSS {100 * (r['peak_rss_mib'] / base - 1):+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
