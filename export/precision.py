"""Half-precision graphs with the precision in the graph: fp16 weights and matmuls, but LayerNorm
and softmax in fp32.

TensorRT 11 builds only strongly typed networks (10.12+ prefers them), so an fp16 engine comes
from an fp16 ONNX graph, not from a builder flag. SAM's LayerNorm overflows in fp16
(segment-anything #696, TensorRT #2564): its ``(x - u).pow(2)`` exceeds 65504 on real
activations. While :func:`fp32_normalisation` is active, every softmax, every LayerNorm
(``nn.LayerNorm`` and the ``LayerNorm2d`` of segment-anything and of TinyViT) and SAM's positional
encoding cast their input to fp32 and their result back, so a trace records Cast -> fp32 op -> Cast
around exactly those layers.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _layer_norm_2d_fp32(self, x: torch.Tensor) -> torch.Tensor:
    y = x.float()
    u = y.mean(1, keepdim=True)
    s = (y - u).pow(2).mean(1, keepdim=True)
    y = (y - u) / torch.sqrt(s + self.eps)
    y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
    return y.to(x.dtype)


def _pe_encoding_fp32(self, coords: torch.Tensor) -> torch.Tensor:
    """SAM's random Fourier positional encoding in fp32: sin/cos of 2*pi*coords lose their
    fraction in fp16, and the dense grid it builds is fp32 anyway."""
    g = self.positional_encoding_gaussian_matrix
    c = (2 * coords.float() - 1) @ g.float()
    c = 2 * torch.pi * c
    return torch.cat([torch.sin(c), torch.cos(c)], dim=-1).to(g.dtype)


@contextlib.contextmanager
def fp32_normalisation(module: nn.Module) -> Iterator[None]:
    """Softmax and LayerNorm in fp32 inside ``module`` (and, for softmax, anywhere) meanwhile."""
    tensor_softmax, torch_softmax, f_softmax, f_layer_norm = (
        torch.Tensor.softmax, torch.softmax, F.softmax, F.layer_norm)

    def softmax(x, dim=None, *args, **kwargs):
        return tensor_softmax(x.float(), dim).to(x.dtype)

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        return f_layer_norm(x.float(), shape, w, b, eps).to(x.dtype)

    patched = []
    for m in module.modules():
        name = type(m).__name__
        if name == "LayerNorm2d":
            m.forward = types.MethodType(_layer_norm_2d_fp32, m)
            patched.append((m, "forward"))
        elif name == "PositionEmbeddingRandom":
            m._pe_encoding = types.MethodType(_pe_encoding_fp32, m)
            patched.append((m, "_pe_encoding"))
    torch.Tensor.softmax, torch.softmax, F.softmax, F.layer_norm = softmax, softmax, softmax, layer_norm
    try:
        yield
    finally:
        torch.Tensor.softmax, torch.softmax, F.softmax, F.layer_norm = (
            tensor_softmax, torch_softmax, f_softmax, f_layer_norm)
        for m, attr in patched:
            delattr(m, attr)


class HalfPrecision(nn.Module):
    """A copy of ``module`` in ``dtype`` with fp32 inputs and outputs (so engines stay
    interchangeable); trace or run it inside :func:`fp32_normalisation`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.dtype = dtype
        self.module = copy.deepcopy(module).to(dtype)

    def forward(self, *args: torch.Tensor):
        out = self.module(*(a.to(self.dtype) if a.is_floating_point() else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()
