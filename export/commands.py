"""The bodies of ``cp-export onnx | trt``, run after :mod:`export.cli` has parsed the flags: this
module imports torch, the engines and the exporters, the parser does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.engines.trt import TensorRTEngine
from cp_deploy.errors import ParityError
from cp_deploy.files import discover_images, read_image
from cp_deploy.models.build import Models, build_models
from export.onnx import export_onnx, sample_inputs, write_manifest
from export.parity import Tolerance, check_parity, synthetic_images
from export.trt import build_trt

# The flags the CLI module parsed (an Flags); argparse itself stays in the CLI modules.
Flags = Any


def _images(folder: str | None, n: int = 4) -> tuple[list[np.ndarray], str]:
    """Real images from ``folder`` (at most 8), else seeded synthetic ones."""

    if folder:
        files = discover_images(folder)[:8]
        return [read_image(Path(folder) / f) for f in files], f"{len(files)} images from {folder}"

    return synthetic_images(n), f"{n} synthetic images"


def _parity(bundle, engine, args, random_run, models: Models | None = None) -> dict:
    """The exported ``engine`` against the torch engine, on ``models`` when the export built them."""
    torch_engine = TorchEngine(bundle, device="cuda" if engine.device.type == "cuda" else "cpu", models=models)
    images, source = _images(args.images)
    random_inputs = sample_inputs(bundle, torch_engine.models, batch=3, instances=5, points=10, seed=1)
    tol = Tolerance.for_precision(engine.manifest.get("precision", "fp32"))
    for flag, attr in (("rel_tol", "rel"), ("pixel_agreement", "pixel_agreement"), ("min_dice", "dice")):
        if getattr(args, flag) is not None:
            setattr(tol, attr, getattr(args, flag))
    rep = check_parity(bundle, torch_engine.models, torch_engine, engine, images, tol,
                       random_inputs=random_inputs, run_graph=random_run)
    print(rep.table())
    return {**rep.to_json(), "images": source}


def _finish(out: Path, parity: dict) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["parity"] = parity
    write_manifest(out, manifest)
    if not parity["passed"]:
        raise ParityError(f"parity check FAILED, engines will refuse {out}: " + "; ".join(parity["failures"]))
    print(f"cp-export: parity passed; graphs and manifest in {out}")
    return 0


def onnx(args: Flags) -> int:
    bundle = load_bundle(args.bundle)
    out = Path(args.out) if args.out else bundle.root / "onnx"
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    models = build_models(bundle)  # exported, then the parity reference: built once
    export_onnx(bundle, models, out, opset=args.opset, external_data=external, precision=args.precision)
    if args.no_parity:
        print("cp-export: parity check skipped (--no-parity); engines accept the graphs unchecked")
        return 0
    engine = OnnxRuntimeEngine(bundle, onnx_dir=out)
    return _finish(out, _parity(bundle, engine, args, lambda g, feeds: engine.run(g, feeds), models))


def trt(args: Flags) -> int:
    out = Path(args.out)
    manifest = build_trt(args.onnx, out, fp16=args.fp16, max_batch=args.max_batch, max_instances=args.max_instances,
                         max_points=args.max_points, workspace_gb=args.workspace)
    if args.no_parity:
        return 0
    bundle = load_bundle(args.bundle or manifest["bundle"])
    engine = TensorRTEngine(bundle, engine_dir=out)
    return _finish(out, _parity(bundle, engine, args, lambda g, feeds: engine.run(g, feeds)))
