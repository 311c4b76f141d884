"""Peak memory of ``cp-deploy batch`` against the number of images.

Each run is a fresh process (``cp-bench memory --child N``) that segments N small synthetic PNGs
with the seeded tiny bundle, so the model's memory is the same in every run and what grows with N
is the run's own bookkeeping (listing, journal, records, progress). The child reports its peak
resident set (``VmHWM``) and samples its resident set as images finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

import cp_bench
from cp_deploy.cli import main as deploy_main
from cp_deploy.models.build import init_bundle


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


def run_child(n: int) -> dict:
    """:func:`child` for ``n`` images in a fresh process; its result."""
    # The child imports this very cp_bench, installed or not.
    root = str(Path(cp_bench.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "cp_bench", "memory", "--child", str(n)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_line(r: dict) -> str:
    """One run's result as one line."""
    return (f"{r['images']} images: exit {r['exit_code']}, {r['records']} records, {r['seconds']} s, "
            f"peak RSS {r['peak_rss_mib']} MiB (before the run {r['rss_before_run_mib']} MiB)")


def growth_lines(runs: list[dict]) -> list[str]:
    """Each later run's peak against the first's."""
    base = runs[0]["peak_rss_mib"]
    return [f"{r['images']} vs {runs[0]['images']} images: peak RSS {100 * (r['peak_rss_mib'] / base - 1):+.1f}%"
            for r in runs[1:]]
