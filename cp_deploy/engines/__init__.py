"""Engines run the networks; the pipeline only sees the :class:`Engine` protocol."""

from __future__ import annotations

from cp_deploy.bundle import Bundle
from cp_deploy.engines.base import Engine

ENGINES = ("torch", "onnxruntime", "trt")


def create_engine(name: str, bundle: Bundle, device: str = "cpu") -> Engine:
    """The engine called ``name`` for ``bundle``; optional ones name the extra they need."""
    if name == "torch":
        from cp_deploy.engines.torch import TorchEngine

        return TorchEngine(bundle, device=device)
    if name in ("onnxruntime", "trt"):
        raise NotImplementedError(
            f"engine '{name}' needs exported graphs (cp-export), which are not built yet; use --engine torch"
        )
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
