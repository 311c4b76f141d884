"""Engines run the networks; the pipeline only sees the :class:`Engine` protocol."""

from __future__ import annotations

from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_deploy.engines.base import Engine
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.engines.openvino import OpenVINOEngine
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.engines.trt import TensorRTEngine

ENGINES = ("torch", "onnxruntime", "openvino", "trt")


def create_engine(name: str, bundle: Bundle, device: str = "cpu", graphs: str | Path | None = None,
                  threads: int = 0, precision: str = "fp32", compile: bool = False) -> Engine:
    """The engine called ``name`` for ``bundle``. ``graphs`` is the folder of exported graphs
    (default: ``BUNDLE/onnx``, or ``BUNDLE/trt`` for trt); ``precision`` and ``compile`` are the torch
    engine's (exported graphs carry their own precision). Optional engines name their extra."""
    if name == "torch":
        return TorchEngine(bundle, device=device, precision=precision, compile=compile)
    if name == "onnxruntime":
        return OnnxRuntimeEngine(bundle, device=device, onnx_dir=graphs, threads=threads)
    if name == "openvino":
        return OpenVINOEngine(bundle, device=device, onnx_dir=graphs, threads=threads)
    if name == "trt":
        return TensorRTEngine(bundle, device="cuda" if device == "cpu" else device, engine_dir=graphs)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
