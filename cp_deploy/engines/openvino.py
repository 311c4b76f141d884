"""OpenVINO engine: the ONNX graphs ``cp-export onnx`` wrote, compiled by OpenVINO's CPU plugin.

It reads the same folder and ``manifest.json`` as the ONNX Runtime engine, with the same checks
(source weights, parity, file hashes); dynamic axes compile as dynamic dimensions. CPU only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS
from cp_deploy.errors import EngineError, MissingExtraError

CPU_ONLY = ("--engine openvino runs on the CPU only; pass --device cpu, or use --engine onnxruntime or trt "
            "for CUDA")


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise MissingExtraError.for_feature("--engine openvino", "openvino") from e
    return openvino


class OpenVINOEngine(GraphEngine):
    """Runs ``encoder``, ``detector``, ``keypoints``, ``box`` and ``refine`` graphs of one ONNX folder."""

    def __init__(self, bundle: Bundle, device: str = "cpu", onnx_dir: str | Path | None = None,
                 threads: int = 0) -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise EngineError(CPU_ONLY)
        ov = import_openvino()
        hint, paths = self.load_onnx_folder(bundle, onnx_dir)
        core = ov.Core()
        # f32 always: on CPUs with AVX512-BF16 or AMX the plugin would otherwise run in bf16 by
        # default (1e-2 off, not the graphs' precision); the export's precision is in the graphs.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.models, self.requests, self.outputs = {}, {}, {}
        for name in GRAPHS:
            path = paths[name]
            try:
                model = core.compile_model(str(path), "CPU", config)
            except Exception as e:  # OpenVINO raises RuntimeError (or its own types) for graphs it cannot read
                raise EngineError(f"{path}: cannot compile the ONNX graph with OpenVINO "
                                  f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}); {hint}") from e
            self.models[name] = model
            self.requests[name] = model.create_infer_request()
            self.outputs[name] = [model.output(t.name) for t in self.manifest["graphs"][name]["outputs"]]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run one graph; outputs in the manifest's order, as CPU tensors the engine no longer holds."""
        result = self.requests[graph].infer(self.numpy_feeds(graph, feeds))
        return [torch.from_numpy(result[port].copy()) for port in self.outputs[graph]]
