"""``cp-export onnx | trt``: export a bundle, then check the result against torch (always)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.engines.trt import TensorRTEngine
from cp_deploy.errors import ParityError, run_command
from cp_deploy.files import discover_images, read_image
from cp_deploy.models.build import build_models
from export.onnx import export_onnx, sample_inputs, write_manifest
from export.parity import Tolerance, check_parity, synthetic_images
from export.trt import build_trt


def _images(folder: str | None, n: int = 4) -> tuple[list[np.ndarray], str]:
    """Real images from ``folder`` (at most 8), else seeded synthetic ones."""

    if folder:
        files = discover_images(folder)[:8]
        return [read_image(Path(folder) / f) for f in files], f"{len(files)} images from {folder}"

    return synthetic_images(n), f"{n} synthetic images"


def _parity(bundle, engine, args, random_run) -> dict:
    torch_engine = TorchEngine(bundle, device="cuda" if engine.device.type == "cuda" else "cpu")
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


def _onnx(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    out = Path(args.out) if args.out else bundle.root / "onnx"
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    export_onnx(bundle, build_models(bundle), out, opset=args.opset, external_data=external, precision=args.precision)
    if args.no_parity:
        print("cp-export: parity check skipped (--no-parity); engines accept the graphs unchecked")
        return 0
    engine = OnnxRuntimeEngine(bundle, onnx_dir=out)
    return _finish(out, _parity(bundle, engine, args, lambda g, feeds: engine.run(g, feeds)))


def _trt(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest = build_trt(args.onnx, out, fp16=args.fp16, max_batch=args.max_batch, max_instances=args.max_instances,
                         max_points=args.max_points, workspace_gb=args.workspace)
    if args.no_parity:
        return 0
    bundle = load_bundle(args.bundle or manifest["bundle"])
    engine = TensorRTEngine(bundle, engine_dir=out)
    return _finish(out, _parity(bundle, engine, args, lambda g, feeds: engine.run(g, feeds)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cp-export", description="Export a bundle to ONNX or TensorRT engines; "
                                     "every export is checked against the torch engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    def parity_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", default=None, help="folder of real images for the parity check "
                       "(default: synthetic images)")
        p.add_argument("--rel-tol", type=float, default=None,
                       help="max abs logit difference, relative to max(1, max|torch output|) "
                       "(default 1e-3 for fp32 graphs, 2e-2 for fp16)")
        p.add_argument("--pixel-agreement", type=float, default=None,
                       help="least fraction of equal final-mask pixels per image (default 0.999; fp16 0.995)")
        p.add_argument("--min-dice", type=float, default=None,
                       help="least Dice between torch and exported final masks per image (default 0.99; fp16 0.98)")
        p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")

    o = sub.add_parser("onnx", help="write the five ONNX graphs and manifest.json",
                       description="Export encoder, detector, keypoint net and both decoders to ONNX.")
    o.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped with the package)")
    o.add_argument("--out", default=None, help="output folder (default: BUNDLE/onnx)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    o.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: half-precision graphs with LayerNorm and softmax in fp32 (for GPUs)")
    o.add_argument("--external-data", default="auto", choices=["auto", "yes", "no"],
                   help="weights in side files: auto = for graphs over 1 GiB (ViT-H's encoder)")
    parity_flags(o)
    o.set_defaults(func=_onnx)

    t = sub.add_parser("trt", help="build TensorRT engines from exported ONNX graphs (on the target GPU)",
                       description="Build serialized TensorRT engines with optimisation profiles.")
    t.add_argument("--onnx", required=True, help="folder written by cp-export onnx")
    t.add_argument("--out", required=True, help="output folder for *.engine and manifest.json")
    t.add_argument("--bundle", default=None, help="bundle for the parity check (default: the one the graphs name)")
    t.add_argument("--fp16", action="store_true",
                   help="fp16 engines (from fp16 graphs, exported into OUT/onnx-fp16 when --onnx holds fp32 ones); "
                   "LayerNorm and softmax stay fp32")
    t.add_argument("--max-batch", type=int, default=8, help="largest image batch the engines accept (default 8)")
    t.add_argument("--max-instances", type=int, default=32, help="largest instance count per decoder call")
    t.add_argument("--max-points", type=int, default=16, help="largest number of prompt points per instance")
    t.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB (default 4)")
    parity_flags(t)
    t.set_defaults(func=_trt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("cp-export", lambda: args.func(args))  # ParityError: exit 1; usage: 2


if __name__ == "__main__":
    sys.exit(main())
