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
from cp_deploy.errors import ParityError, UsageError
from cp_deploy.files import discover_images, read_image
from cp_deploy.models.build import Models, build_models
from cp_train.data import load_samples, read_split
from export.int8 import Gate, GateImages, calibration_images, quantization_tools, quantize_folder
from export.onnx import export_onnx, sample_inputs, write_manifest
from export.parity import Tolerance, check_parity, synthetic_images
from export.trt import build_trt

# The flags the CLI module parsed (an Flags); argparse itself stays in the CLI modules.
Flags = Any


def _images(folder: str | None, n: int = 4) -> tuple[list[np.ndarray], list[str], str]:
    """Real images from ``folder`` (at most 8), else seeded synthetic ones; with their names."""

    if folder:
        files = [str(f) for f in discover_images(folder)[:8]]
        return [read_image(Path(folder) / f) for f in files], files, f"{len(files)} images from {folder}"

    return synthetic_images(n), [f"synthetic-{i}" for i in range(n)], f"{n} synthetic images"


def _parity(bundle, engine, args, random_run, models: Models | None = None) -> dict:
    """The exported ``engine`` against the torch engine, on ``models`` when the export built them."""
    torch_engine = TorchEngine(bundle, device="cuda" if engine.device.type == "cuda" else "cpu", models=models)
    images, _, source = _images(args.images)
    random_inputs = sample_inputs(bundle, torch_engine.models, batch=3, instances=5, points=10, seed=1)
    tol = Tolerance.for_manifest(engine.manifest)
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


def _check_int8_flags(args: Flags) -> None:
    """The int8 flags make sense together, before anything is loaded."""
    if args.precision == "int8" and not args.calib_images:
        raise UsageError("--precision int8 needs --calib-images DIR, a folder of training images to calibrate on "
                         "(never test images)")
    given = [f for f in ("calib_images", "val_data", "val_split") if getattr(args, f)]
    if args.precision != "int8" and given:
        raise UsageError(f"--{given[0].replace('_', '-')} is for --precision int8 only")
    if bool(args.val_data) != bool(args.val_split):
        raise UsageError("--val-data and --val-split go together: the validation folder (images/, masks/) and "
                         "the file of its names")
    if args.precision == "int8":
        quantization_tools()  # a missing extra is said now, not after the fp32 export


def _int8_inputs(args: Flags) -> tuple[list[np.ndarray], GateImages, dict]:
    """Calibration images, the gate's images and what the manifest says of them: read before the
    export, so a bad folder fails at once."""
    calib, _ = calibration_images(args.calib_images, args.calib_count)
    images, names, source = _images(args.images)
    gate_images = GateImages(names, images)
    info = {"calibration": {"folder": str(Path(args.calib_images).resolve()), "images": len(calib)},
            "gate_images": source, "validation": None}
    if args.val_data:
        samples = load_samples(args.val_data, read_split(args.val_split), progress=False)
        gate_images.val_names = [s.name for s in samples]
        gate_images.val_images = [s.image for s in samples]
        gate_images.val_masks = [s.mask for s in samples]
        info["validation"] = {"data": str(Path(args.val_data).resolve()), "split": str(Path(args.val_split).resolve()),
                              "images": len(samples)}
    return calib, gate_images, info


def onnx(args: Flags) -> int:
    _check_int8_flags(args)
    bundle = load_bundle(args.bundle)
    out = Path(args.out) if args.out else bundle.root / "onnx"
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    models = build_models(bundle)  # exported, then the parity reference: built once
    int8 = _int8_inputs(args) if args.precision == "int8" else None
    export_onnx(bundle, models, out, opset=args.opset, external_data=external,
                precision="fp32" if int8 else args.precision)
    if int8:
        calib, gate_images, info = int8
        verdicts = quantize_folder(bundle, out, calib, gate_images, Gate(args.int8_min_dice, args.int8_max_mdice_drop),
                                   info)
        kept = [g for g, v in verdicts.items() if v.reason is None]
        print(f"cp-export: int8 kept for {', '.join(kept) or 'no graph'}; fp32 for the others (manifest.json says why)")
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
