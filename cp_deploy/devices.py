"""``--device auto``: the device a run gets when the user names none, resolved after parsing."""

from __future__ import annotations

import torch


def resolve_device(device: str, engine: str = "torch") -> str:
    """``auto`` becomes ``cuda`` where torch sees a GPU, else ``cpu`` (always ``cpu`` for the
    CPU-only ``openvino`` engine); other spellings pass unchanged
    (``cp_deploy.executors.check_device`` then checks that the GPU named is there)."""
    if device == "auto" and engine == "openvino":
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
