"""Weight files: hashing, safetensors I/O and strict loading with errors that name the keys."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cp_deploy.errors import WeightsError
from cp_deploy.files import atomic_write_bytes


def sha256_file(path: str | Path) -> str:
    """The file's sha256 as 64 hex digits, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or a PyTorch checkpoint (``weights_only``), checking its hash."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise WeightsError(
                f"{path}: sha256 is {actual}, expected {sha256}. The file is corrupt or not the "
                "one this bundle was made with; restore it or rebuild the bundle."
            )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e}); restore it or rebuild the "
                               "bundle") from e
    try:
        # weights_only: a checkpoint is data; pickled objects could run code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's own message suggests weights_only=False, which would run the file's code: never.
        raise WeightsError(
            f"{path}: not a plain tensor checkpoint (it holds pickled objects, or is not a PyTorch file), "
            "and its pickled objects are not loaded; convert it to safetensors or a state dict of tensors"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(state).__name__}); convert it to "
                           "safetensors or a state dict of tensors")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error listing the first mismatching keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{name}: {', '.join(items[:5])}{more}")
        raise WeightsError(f"{source} does not match the model config; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def save_state_dict(module_or_state: nn.Module | dict, path: str | Path, dtype: torch.dtype | None = None) -> str:
    """Write contiguous tensors as safetensors (atomically) and return the file's sha256.

    ``dtype`` (e.g. ``torch.float16``) casts floating tensors to halve the file; loading casts
    them back to the module's own precision.
    """
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    # Tied weights (Grounding DINO's box heads) share storage, which safetensors refuses: each
    # name gets its own copy, and a strict load writes the same values into the one parameter.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    data = save(state)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()  # of the bytes written: no second read of the file
