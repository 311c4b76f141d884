"""The bodies of ``cp-export onnx | trt``, run after :mod:`export.cli` has parsed the flags: this
module imports torch, the engines and the exporters, the parser does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.engines.openvino import OpenVINOEngine, cpu_has_bf16
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.engines.trt import TensorRTEngine
from cp_deploy.errors import EngineError, ParityError, UsageError
from cp_deploy.files import discover_images, read_image
from cp_deploy.models.build import Models, build_models
from cp_train.data import load_samples, read_split
from export.bf16 import NO_BF16, bf16_folder
from export.gate import Gate, GateImages
from export.int8 import calibration_images, quantization_tools, quantize_folder
from export.nncf_int8 import import_nncf, nncf_folder
from export.onnx import export_onnx, sample_inputs, write_manifest
from export.parity import Tolerance, check_parity, synthetic_images
from export.trt import build_trt

GATED = ("int8", "bf16")  # precisions whose graphs pass the gate of export.gate

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


def _check_gate_flags(args: Flags) -> None:
    """The int8 and bf16 flags make sense together, before anything is loaded."""
    if args.nncf_int8 and args.precision != "bf16":
        raise UsageError("--nncf-int8 is for --precision bf16: its int8 graphs run their float operations as "
                         "the bf16 gate decided")
    calibrates = args.precision == "int8" or bool(args.nncf_int8)
    if calibrates and not args.calib_images:
        raise UsageError(f"{'--nncf-int8' if args.nncf_int8 else '--precision int8'} needs --calib-images DIR, a "
                         "folder of training images to calibrate on (never test images)")
    if not calibrates and args.calib_images:
        raise UsageError("--calib-images is for --precision int8 or --nncf-int8 only")
    given = [f for f in ("val_data", "val_split") if getattr(args, f)]
    if args.precision not in GATED and given:
        raise UsageError(f"--{given[0].replace('_', '-')} is for --precision int8 or bf16 only")
    if bool(args.val_data) != bool(args.val_split):
        raise UsageError("--val-data and --val-split go together: the validation folder (images/, masks/) and "
                         "the file of its names")
    # A missing extra is said now, not after the fp32 export.
    if args.precision == "int8":
        quantization_tools()
    if args.precision == "bf16" and not cpu_has_bf16():  # also names a missing openvino extra
        raise EngineError(NO_BF16)
    if args.nncf_int8:
        import_nncf()


def _gate_inputs(args: Flags) -> tuple[list[np.ndarray], GateImages, dict]:
    """Calibration images (int8), the gate's images and what the manifest says of them: read
    before the export, so a bad folder fails at once."""
    calib = calibration_images(args.calib_images, args.calib_count)[0] if args.calib_images else []
    images, names, source = _images(args.images)
    gate_images = GateImages(names, images)
    info = {"gate_images": source, "validation": None}
    if calib:
        info["calibration"] = {"folder": str(Path(args.calib_images).resolve()), "images": len(calib)}
    if args.val_data:
        samples = load_samples(args.val_data, read_split(args.val_split), progress=False)
        gate_images.val_names = [s.name for s in samples]
        gate_images.val_images = [s.image for s in samples]
        gate_images.val_masks = [s.mask for s in samples]
        info["validation"] = {"data": str(Path(args.val_data).resolve()), "split": str(Path(args.val_split).resolve()),
                              "images": len(samples)}
    return calib, gate_images, info


def onnx(args: Flags) -> int:
    _check_gate_flags(args)
    bundle = load_bundle(args.bundle)
    out = Path(args.out) if args.out else bundle.root / "onnx"
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    models = build_models(bundle)  # exported, then the parity reference: built once
    gated = _gate_inputs(args) if args.precision in GATED else None
    export_onnx(bundle, models, out, opset=args.opset, external_data=external,
                precision="fp32" if gated else args.precision)
    if gated:
        calib, gate_images, info = gated
        gate = Gate(args.int8_min_dice, args.int8_max_mdice_drop)
        uncalibrated = {k: v for k, v in info.items() if k != "calibration"}  # bf16's own gate calibrates nothing
        verdicts = (quantize_folder(bundle, out, calib, gate_images, gate, info) if args.precision == "int8"
                    else bf16_folder(bundle, out, gate_images, gate, uncalibrated))
        kept = [g for g, v in verdicts.items() if v.reason is None]
        others = "; fp32 for the others (manifest.json says why)" if len(kept) < len(verdicts) else ""
        print(f"cp-export: {args.precision} kept for {', '.join(kept) or 'no graph'}{others}")
        if args.nncf_int8:
            verdicts = nncf_folder(bundle, out, calib, args.nncf_int8, gate_images, gate, info)
            kept = [g for g, v in verdicts.items() if v.reason is None]
            print(f"cp-export: NNCF int8 kept for {', '.join(kept) or 'no graph'}"
                  + ("; the others as above (manifest.json says why)" if len(kept) < len(verdicts) else ""))
    if args.no_parity:
        print("cp-export: parity check skipped (--no-parity); engines accept the graphs unchecked")
        return 0
    # A bf16 folder is OpenVINO's alone; the other folders are checked on ONNX Runtime.
    engine = (OpenVINOEngine(bundle, onnx_dir=out) if args.precision == "bf16"
              else OnnxRuntimeEngine(bundle, onnx_dir=out))
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
