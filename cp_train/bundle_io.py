"""Derive a new bundle from a base bundle, replacing the stages that were trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import BUNDLE_FILE, Bundle
from cp_deploy.models.build import write_bundle


def derive_bundle(base: Bundle, out: str | Path, replace: dict[str, tuple[dict | None, nn.Module | dict]],
                  metadata: dict | None = None, prompt: dict | None = None) -> Bundle:
    """Copy ``base`` to ``out`` with some stages replaced.

    ``replace`` maps ``detector``, ``keypoints``, ``box`` or ``refine`` to (new bundle.json entry
    or ``None`` to keep the entry, weights). Files of the stages kept are copied with their hashes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads((base.root / BUNDLE_FILE).read_text())
    for key in ("detector", "keypoints"):
        entry = spec[key]
        if key in replace:
            if replace[key][0] is not None:
                spec[key] = dict(replace[key][0])
            spec[key].pop("file", None)
            spec[key].pop("sha256", None)
        elif entry.get("file"):
            _copy(base.root / entry["file"], out)
    heads = spec.setdefault("heads", {})
    for key in ("box", "refine"):
        entry = heads.get(key)
        if key in replace:
            heads[key] = None
        elif entry and entry.get("file"):
            _copy(base.root / entry["file"], out)
    sam = spec["sam"]
    if sam.get("checkpoint") and not Path(sam["checkpoint"]).is_absolute():
        _copy(base.root / sam["checkpoint"], out)
    spec.setdefault("metadata", {}).update(metadata or {})
    spec.setdefault("prompt", {}).update(prompt or {})
    # fp16 storage halves the bundle; the networks run in the engine's own precision.
    return write_bundle(out, spec, {k: v[1] for k, v in replace.items()}, weight_dtype=torch.float16)


def update_spec(bundle_dir: str | Path, section: str, values: dict) -> None:
    """Merge ``values`` into ``section`` (e.g. ``prompt``, ``metadata``) of a written bundle's
    bundle.json, atomically; weights and their hashes are untouched."""
    path = Path(bundle_dir) / BUNDLE_FILE
    spec = json.loads(path.read_text())
    spec.setdefault(section, {}).update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(path)


def _copy(src: Path, out_dir: Path) -> None:
    dst = out_dir / src.name
    if src.resolve() != dst.resolve():
        shutil.copy2(src, dst)
