"""Engines run the networks; the pipeline only sees the :class:`Engine` protocol."""

from __future__ import annotations

from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_deploy.engines.base import Engine

ENGINES = ("torch", "onnxruntime", "trt")


def create_engine(name: str, bundle: Bundle, device: str = "cpu", graphs: str | Path | None = None,
                  threads: int = 0) -> Engine:
    """The engine called ``name`` for ``bundle``. ``graphs`` is the folder of exported graphs
    (default: ``BUNDLE/onnx`` or ``BUNDLE/trt``); optional engines name the extra they need."""
    if name == "torch":
        from cp_deploy.engines.torch import TorchEngine

        return TorchEngine(bundle, device=device)
    if name == "onnxruntime":
        from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, device=device, onnx_dir=graphs, threads=threads)
    if name == "trt":
        from cp_deploy.engines.trt import TensorRTEngine

        return TensorRTEngine(bundle, device="cuda" if device == "cpu" else device, engine_dir=graphs)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
