"""OpenVINO engine: the ONNX graphs ``cp-export onnx`` wrote, compiled by OpenVINO's CPU plugin.

It reads the same folder and ``manifest.json`` as the ONNX Runtime engine, with the same checks
(source weights, parity, file hashes); dynamic axes compile as dynamic dimensions. CPU only.

A graph the manifest marks ``bf16`` (``cp-export onnx --precision bf16``: fp32 files, gated in
bf16 on OpenVINO) compiles with the bf16 inference hint; every other graph with f32. On a CPU
without bf16 instructions the plugin runs it in f32; :attr:`OpenVINOEngine.precisions` reads what
each compiled graph really runs in.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.constants import DEFAULT_CACHE_DIR
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS
from cp_deploy.errors import EngineError, MissingExtraError

# Compiled graphs, one folder per graph file's sha256 (the manifest's, checked against the file
# before compiling), so a re-exported graph never meets another's compiled blob.
COMPILE_CACHE = DEFAULT_CACHE_DIR / "openvino"
_FIRST_CALL = threading.Lock()
_bindings_ready = False
CPU_ONLY = ("--engine openvino runs on the CPU only; pass --device cpu, or use --engine onnxruntime or trt "
            "for CUDA")


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise MissingExtraError.for_feature("--engine openvino", "openvino") from e
    return openvino


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile every time
        return False
    return os.access(folder, os.W_OK)


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (AVX512-BF16 or AMX); without, a bf16 hint runs in f32."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOEngine(GraphEngine):
    """Runs ``encoder``, ``detector``, ``keypoints``, ``box`` and ``refine`` graphs of one ONNX folder."""

    def __init__(self, bundle: Bundle, device: str = "cpu", onnx_dir: str | Path | None = None,
                 threads: int = 0, cache: Path | None = COMPILE_CACHE) -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise EngineError(CPU_ONLY)
        ov = import_openvino()
        hint, paths = self.load_onnx_folder(bundle, onnx_dir)
        core = ov.Core()
        config = {}
        if threads:
            # Pinning puts every compiled model's threads on the first cores: two one-thread model
            # workers then share one core (measured: 0.82 against 1.72 encoder passes/s on 2 cores).
            config.update(INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False)
        self.models, self.requests, self.outputs = {}, {}, {}
        for name in GRAPHS:
            path = paths[name]
            # The hint is always set: on CPUs with AVX512-BF16 or AMX the plugin otherwise picks bf16
            # by itself, for graphs the gate never saw in bf16.
            spec = self.manifest["graphs"][name]
            hint = "bf16" if spec.get("precision") == "bf16" else "f32"
            options = {**config, "INFERENCE_PRECISION_HINT": hint}
            blobs = cache / spec["sha256"][:16] if cache is not None else None
            if blobs is not None and _writable(blobs):
                # The default bundle's five graphs load from it in 0.55 s, against 3.4 s compiling.
                options["CACHE_DIR"] = str(blobs)
            try:
                model = core.compile_model(str(path), "CPU", options)
            except Exception as e:  # OpenVINO raises RuntimeError (or its own types) for graphs it cannot read
                raise EngineError(f"{path}: cannot compile the ONNX graph with OpenVINO "
                                  f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}); {hint}") from e
            self.models[name] = model
            self.requests[name] = model.create_infer_request()
            self.outputs[name] = [model.output(t.name) for t in self.manifest["graphs"][name]["outputs"]]

    @property
    def precisions(self) -> dict[str, str]:
        """Each graph's precision as compiled: the manifest's, with ``bf16`` read back from the
        plugin (``f32`` where the CPU has no bf16 instructions)."""
        out = {}
        for name, model in self.models.items():
            declared = self.manifest["graphs"][name].get("precision", "fp32")
            if declared == "bf16" and model.get_property("INFERENCE_PRECISION_HINT").get_type_name() != "bf16":
                declared = "fp32"
            out[name] = declared
        return out

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run one graph; outputs in the manifest's order, as CPU tensors the engine no longer holds."""
        global _bindings_ready
        if not _bindings_ready:
            # The bindings set up their numpy bridge on first use; two model workers doing so at
            # once deadlock (one holds the GIL and waits on a C++ static guard, the other holds
            # the guard and waits on the GIL: seen in a cp-bench --end-to-end run). The first
            # call in the process runs alone.
            with _FIRST_CALL:
                out = self._run(graph, feeds)
                _bindings_ready = True
            return out
        return self._run(graph, feeds)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        result = self.requests[graph].infer(self.numpy_feeds(graph, feeds))
        return [torch.from_numpy(result[port].copy()) for port in self.outputs[graph]]
