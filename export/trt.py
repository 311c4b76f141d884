"""Build serialized TensorRT engines from the exported ONNX graphs.

Optimisation profiles: batch 1..N for the encoder, detector and keypoint features; instances
1..K and prompt points 1..P for the decoders (and the keypoint net's RoIs).

fp16 is built the way TensorRT 10.12+ wants and 11.x requires: strongly typed, with the precision
in the graph. The networks are built from graphs that ``cp-export onnx --precision fp16`` wrote
(fp16 weights and matmuls, LayerNorm, softmax and the positional encoding in fp32: see
``export/precision.py``); ``build_trt`` writes those first when given fp32 graphs and
``fp16=True``. Inputs and outputs stay fp32, so engines are interchangeable for the pipeline.

The manifest records the TensorRT version and the GPU; :class:`cp_deploy.engines.trt.TensorRTEngine`
refuses engines built elsewhere.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.manifest import GRAPHS, check_graph_files, read_manifest
from cp_deploy.errors import EngineError
from cp_deploy.files import atomic_write_bytes
from cp_deploy.models.build import build_models
from cp_deploy.models.weights import sha256_file
from export.onnx import export_onnx, write_manifest


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise EngineError("TensorRT is not installed: pip install 'curriculum-prompting[trt]' "
                          "(needs an NVIDIA GPU and driver)") from e
    return tensorrt


def gpu_identity() -> dict:
    """The GPU an engine is built for (TensorRT engines are specific to it)."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError("TensorRT engines are built on the GPU that will run them, and torch sees no CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def profile_shapes(spec_shape: tuple, max_dims: dict[str, int], opt_dims: dict[str, int]) -> tuple:
    """(min, opt, max) shapes of one input: each dynamic axis from 1 to its maximum."""
    lo = tuple(1 if isinstance(d, str) else d for d in spec_shape)
    opt = tuple(opt_dims[d] if isinstance(d, str) else d for d in spec_shape)
    hi = tuple(max_dims[d] if isinstance(d, str) else d for d in spec_shape)
    return lo, opt, hi


def build_trt(onnx_dir: str | Path, out: str | Path, fp16: bool = False, max_batch: int = 8,
              max_instances: int = 32, max_points: int = 16, workspace_gb: float = 4.0,
              progress: bool = True) -> dict:
    """Build one ``.engine`` per graph of ``onnx_dir`` into ``out`` and write its manifest."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    hint = f"export the graphs first: cp-export onnx --bundle B --out {onnx_dir}"
    src = read_manifest(onnx_dir, hint)
    if src.get("precision") in ("int8", "bf16"):
        # The gate measured these graphs on the CPU engines, not on TensorRT's kernels.
        raise EngineError(f"{onnx_dir}: cp-export trt builds from fp32 or fp16 graphs, and these are "
                          f"{src['precision']} (made for the CPU engines); {hint} (without --precision "
                          f"{src['precision']})")
    trt = import_tensorrt()
    out.mkdir(parents=True, exist_ok=True)
    if fp16 and src.get("precision", "fp32") != "fp16":
        onnx_dir = out / "onnx-fp16"
        _export_fp16(src["bundle"], onnx_dir, progress)
        src = read_manifest(onnx_dir, hint)
    # An engine built from a swapped or edited graph would carry its own valid hash: check first.
    check_graph_files(src, onnx_dir, "re-export them with cp-export onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    max_dims = {"batch": max_batch, "instances": max_instances, "points": max_points}
    opt_dims = {"batch": max(1, max_batch // 2), "instances": max(1, min(8, max_instances)),
                "points": min(9, max_points)}
    graphs = {}
    for name in GRAPHS:
        t0 = time.perf_counter()
        g = src["graphs"][name]
        onnx_path = onnx_dir / g["file"]
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # implied (and ignored) in 11.x
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(onnx_path))
        if not ok:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT cannot parse the graph ({errors}); "
                              "re-export it with cp-export onnx")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if hasattr(trt.BuilderFlag, "TF32"):  # fp32 graphs mean fp32 math, not TF32 matmuls
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for t in g["inputs"]:
            profile.set_shape(t.name, *profile_shapes(t.shape, max_dims, opt_dims))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
        path = out / f"{name}.engine"
        atomic_write_bytes(path, bytes(serialized))
        graphs[name] = {**g, "file": path.name, "external_data": None, "external_data_sha256": None,
                        "sha256": sha256_file(path),
                        "onnx_sha256": g["sha256"],
                        "inputs": [t.to_json() for t in g["inputs"]], "outputs": [t.to_json() for t in g["outputs"]],
                        "profile": {"max": max_dims}}
        if progress:
            print(f"cp-export: {path.name} built in {time.perf_counter() - t0:.1f} s", flush=True)
    manifest = {**{k: v for k, v in src.items() if k != "graphs"}, "format": "trt", "tensorrt": trt.__version__,
                "precision": src.get("precision", "fp32"),
                **gpu_identity(), "max_dims": max_dims, "graphs": graphs,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_manifest(out, manifest)
    shutil.copy2(onnx_dir / "manifest.json", out / "onnx_manifest.json")
    return manifest


def _export_fp16(bundle_dir: str, out: Path, progress: bool) -> None:
    bundle = load_bundle(bundle_dir)
    export_onnx(bundle, build_models(bundle), out, precision="fp16", progress=progress)
