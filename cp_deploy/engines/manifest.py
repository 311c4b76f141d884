"""``manifest.json`` of an exported graph folder: what ``cp-export`` wrote and engines check.

One manifest per folder (``onnx/`` or ``trt/``). It names the graphs, their input and output
tensors with shapes (strings are dynamic axes), and the sha256 of every source weight file, so an
engine can tell graphs exported from other weights than the bundle it serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import Bundle

MANIFEST_FILE = "manifest.json"
GRAPHS = ("encoder", "detector", "keypoints", "box", "refine")


class EngineError(RuntimeError):
    """Exported graphs or engines cannot serve this run; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, and strings for dynamic axes
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float32"))


def bundle_sources(bundle: Bundle) -> dict[str, str | None]:
    """sha256 of each weight file the graphs are built from (``None``: base weights of a pip
    package, hash-checked when loaded), and the text prompt where the detector's graph holds it."""
    from cp_deploy.models.detector import TEXT_PROMPTED
    from cp_deploy.models.weights import sha256_file

    refs = {"sam": bundle.sam, "box": bundle.box_head, "refine": bundle.refine_head,
            "detector": bundle.detector, "keypoints": bundle.keypoints}
    out = {k: r.sha256 or (sha256_file(r.file) if r.file is not None else None) for k, r in refs.items()}
    if bundle.detector.arch in TEXT_PROMPTED:
        # The prompt's features are constants of the detector graph: another text needs a new export.
        out["prompt.text"] = bundle.prompt.text
    return out


def resolve_shape(spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """A spec's shape with its dynamic axes bound (``dims``: axis name -> size)."""
    return tuple(dims[d] if isinstance(d, str) else int(d) for d in spec.shape)


def read_manifest(folder: str | Path, rebuild_hint: str) -> dict:
    """Load ``folder/manifest.json``; a missing or unreadable one is an :class:`EngineError`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise EngineError(f"no exported graphs at '{folder}' ({MANIFEST_FILE} is missing); {rebuild_hint}")
    try:
        manifest = json.loads(path.read_text())
        manifest["graphs"] = {
            name: {**g, "inputs": [TensorSpec.from_json(t) for t in g["inputs"]],
                   "outputs": [TensorSpec.from_json(t) for t in g["outputs"]]}
            for name, g in manifest["graphs"].items()
        }
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"{path}: not a valid manifest ({e!r}); {rebuild_hint}") from e
    missing = [g for g in GRAPHS if g not in manifest["graphs"]]
    if missing:
        raise EngineError(f"{path}: graphs {', '.join(missing)} are missing; {rebuild_hint}")
    return manifest


def check_sources(manifest: dict, bundle: Bundle, folder: str | Path, rebuild_hint: str) -> None:
    """Refuse graphs exported from other weights than ``bundle``'s, or that failed parity."""
    ours = bundle_sources(bundle)
    theirs = manifest.get("sources", {})
    stale = [k for k, v in ours.items() if theirs.get(k) != v]
    if stale:
        raise EngineError(
            f"{Path(folder) / MANIFEST_FILE}: the graphs were exported from other weights than the bundle "
            f"'{bundle.root}' ({', '.join(stale)} differ); {rebuild_hint}"
        )
    parity = manifest.get("parity")
    if parity is not None and not parity.get("passed", False):
        raise EngineError(
            f"{Path(folder) / MANIFEST_FILE}: these graphs failed the parity check against torch when they "
            f"were exported ({'; '.join(parity.get('failures', []))}); {rebuild_hint}"
        )
