"""Can the image encoder run in int8? NNCF's OpenVINO backend quantises an exported fp32 encoder,
and the tool measures what that buys and costs against fp32 and bf16, in one process.

    python -m tools.int8_encoder --graphs G --calib-images TRAIN --images VAL
        [--bundle B] [--calib-count 64] [--count 24] [--threads 2] [--ignore REGEX ...] [--json out.json]

* quantisation: :func:`export.nncf_int8.quantize` (the transformer preset: SmoothQuant, fast bias
  correction), calibrated on training images; ``--ignore`` keeps the matching nodes in float
  (none by default; ``cp-export --nncf-int8`` keeps its ``FLOAT_SCOPES``);
* error: per image ``||e - e_fp32|| / ||e_fp32||`` of the image embedding, for bf16 and int8;
* speed: ms per image of one static-shape compile of each, ``--threads`` threads.

Needs the ``nncf`` extra. benchmarks/RESULTS.md has runs, with and without the float scopes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cp_bench.results import write_json
from cp_deploy.bundle import default_bundle_path, load_bundle
from cp_deploy.engines.manifest import MANIFEST_FILE
from cp_deploy.engines.openvino import import_openvino
from cp_deploy.preprocess import preprocess_image
from export.int8 import calibration_images
from export.nncf_int8 import import_nncf, quantize

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}  # int8's float ops in bf16


def encoder_inputs(images: list[np.ndarray], bundle_path: Path) -> list[np.ndarray]:
    cfg = load_bundle(bundle_path).preprocess
    return [preprocess_image(im, cfg)[0].numpy()[None] for im in images]


def ms_per_image(compiled, x: np.ndarray, rounds: int = 10) -> float:
    for _ in range(3):
        compiled(x)
    t0 = time.perf_counter()
    for _ in range(rounds):
        compiled(x)
    return (time.perf_counter() - t0) / rounds * 1000


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.int8_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--graphs", required=True, type=Path, help="an fp32 folder written by cp-export onnx")
    p.add_argument("--bundle", type=Path, default=default_bundle_path())
    p.add_argument("--calib-images", required=True, help="a folder of training images")
    p.add_argument("--calib-count", type=int, default=64)
    p.add_argument("--images", required=True, help="a folder of validation images to measure on")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ignore", nargs="*", default=[], help="node-name regexes kept in float")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    ov, nncf = import_openvino(), import_nncf()  # each names its missing extra

    if not (a.graphs / MANIFEST_FILE).is_file():
        p.error(f"--graphs '{a.graphs}' has no {MANIFEST_FILE}; pass a folder written by cp-export onnx")
    calib = encoder_inputs(calibration_images(a.calib_images, a.calib_count)[0], a.bundle)
    val = encoder_inputs(calibration_images(a.images, a.count)[0], a.bundle)
    core = ov.Core()
    src = str(a.graphs / "encoder.onnx")
    t0 = time.perf_counter()
    int8 = quantize(core.read_model(src), calib, "encoder", float_scopes=a.ignore)
    quant_s = time.perf_counter() - t0

    def compiled(precision: str):
        model = int8 if precision == "int8" else core.read_model(src)
        model.reshape([1, *val[0].shape[1:]])
        return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": a.threads,
                                                 "INFERENCE_PRECISION_HINT": PRECISION_HINT[precision]})

    fp32 = compiled("fp32")
    ref = [fp32(x)[0] for x in val]
    rows = {"fp32": {"ms_per_image": round(ms_per_image(fp32, val[0]), 1)}}
    for precision in ("bf16", "int8"):
        c = compiled(precision)
        err = [float(np.linalg.norm(c(x)[0] - r) / np.linalg.norm(r)) for x, r in zip(val, ref)]
        rows[precision] = {"ms_per_image": round(ms_per_image(c, val[0]), 1),
                           "rel_error_mean": round(float(np.mean(err)), 4),
                           "rel_error_max": round(float(np.max(err)), 4)}
    print(f"int8 encoder quantised by NNCF {nncf.__version__} on {len(calib)} images in {quant_s:.0f} s; "
          f"{len(val)} images, {a.threads} threads")
    print("| precision | ms per image | embedding error, mean | max |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['ms_per_image']} | {r.get('rel_error_mean', 0)} | {r.get('rel_error_max', 0)} |")
    out = {"nncf": nncf.__version__, "openvino": ov.__version__, "calib_images": len(calib), "images": len(val),
           "threads": a.threads, "ignore": a.ignore, "quantise_s": round(quant_s, 1), "rows": rows}
    if a.json:
        write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
