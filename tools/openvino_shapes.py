"""The OpenVINO engine's graphs on their dynamic model against their per-shape static compile,
on the feeds of a real pipeline call, timed in turn in one process.

    python -m tools.openvino_shapes --graphs G [--bundle B] [--image examples/images/X.jpg]
        [--threads 1] [--rounds 8] [--json out.json]

Both requests come from the same :class:`~cp_deploy.engines.openvino.OpenVINOEngine`: the one it
compiled at load and the one it compiled for the feeds' shapes, so the table measures the choice
the engine makes (benchmarks/RESULTS.md has a run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cp_bench.results import write_json
from cp_deploy.engines.manifest import GRAPHS
from cp_deploy.engines.openvino import OpenVINOEngine
from cp_deploy.files import discover_images, read_image
from cp_deploy.pipeline import CurriculumPipeline


def recorded_feeds(pipe: CurriculumPipeline, image) -> dict[str, dict]:
    """Each graph's numpy feeds from one ``predict`` of ``image`` (the last call of each graph)."""
    engine, feeds, run = pipe.engine, {}, pipe.engine.run

    def recording(graph, tensors):
        feeds[graph] = engine.numpy_feeds(graph, tensors)
        return run(graph, tensors)

    engine.run = recording
    try:
        pipe.predict([image])
    finally:
        del engine.run
    return feeds


def time_requests(engine: OpenVINOEngine, feeds: dict[str, dict], rounds: int) -> dict[str, dict]:
    """ms per call of each graph on the dynamic and the static request, alternating, after a warm-up."""
    out = {}
    for graph in GRAPHS:
        if graph not in feeds:
            continue
        arrays = feeds[graph]
        requests = {"dynamic": engine.requests[graph], "static": engine.request_for(graph, arrays)}
        totals = dict.fromkeys(requests, 0.0)
        for r in requests.values():
            r.infer(arrays)
        for _ in range(rounds):
            for name, r in requests.items():
                t0 = time.perf_counter()
                r.infer(arrays)
                totals[name] += time.perf_counter() - t0
        out[graph] = {k: round(v * 1000 / rounds, 2) for k, v in totals.items()}
        out[graph]["shapes"] = {k: list(a.shape) for k, a in arrays.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", required=True, help="a cp-export onnx folder")
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--image", default=None, help="image to record feeds on (default: the first example)")
    ap.add_argument("--threads", type=int, default=1, help="OpenVINO threads (default: 1)")
    ap.add_argument("--rounds", type=int, default=8, help="timed calls of each request (default: 8)")
    ap.add_argument("--json", default=None, help="also write the table here")
    a = ap.parse_args(argv)
    image = Path(a.image) if a.image else Path("examples/images") / discover_images("examples/images")[0]
    pipe = CurriculumPipeline.from_bundle(a.bundle, "openvino", graphs=a.graphs, threads=a.threads)
    result = time_requests(pipe.engine, recorded_feeds(pipe, read_image(image)), a.rounds)
    print(f"OpenVINO, {a.threads} thread(s), {a.graphs}, feeds of {image.name}, {a.rounds} rounds")
    print("| graph | dynamic ms | static ms |\n| --- | --- | --- |")
    for graph, row in result.items():
        print(f"| {graph} | {row['dynamic']} | {row['static']} |")
    if a.json:
        write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
