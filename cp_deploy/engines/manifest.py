"""``manifest.json`` of an exported graph folder: what ``cp-export`` wrote and engines check.

One manifest per folder (``onnx/`` or ``trt/``). It names the graphs, their input and output
tensors with shapes (strings are dynamic axes), the sha256 of every graph file (and of its
external-data file), and the sha256 of every source weight file, so an engine can tell graphs
that were swapped, edited or exported from other weights than the bundle it serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_deploy.errors import EngineError
from cp_deploy.models.registry import detector_family
from cp_deploy.models.weights import sha256_file

MANIFEST_FILE = "manifest.json"
# The manifest's "format" of a graph file that is OpenVINO IR (.xml, its .bin the external data), not ONNX.
OPENVINO_IR = "openvino-ir"
GRAPHS = ("encoder", "detector", "keypoints", "box", "refine")


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
    refs = {"sam": bundle.sam, "box": bundle.box_head, "refine": bundle.refine_head,
            "detector": bundle.detector, "keypoints": bundle.keypoints}
    out = {k: r.sha256 for k, r in refs.items()}  # load_bundle requires a sha256 for every file
    if detector_family(bundle.detector.arch).text_prompted:
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


def check_graph_files(manifest: dict, folder: str | Path, rebuild_hint: str) -> dict[str, Path]:
    """Each graph's path, after checking that its file (and external-data file) has the sha256
    the manifest records.

    A graph swapped for another or re-weighted still loads and runs, and only its masks are wrong:
    the hash is the one check that catches it, so a graph without a recorded hash is refused too.
    """
    folder = Path(folder)
    where = folder / MANIFEST_FILE
    paths = {}
    for name in GRAPHS:
        g = manifest["graphs"][name]
        files = [("file", "sha256")]
        if g.get("external_data"):
            files.append(("external_data", "external_data_sha256"))
        for file_key, sha_key in files:
            fname = g.get(file_key)
            # Plain names only: the manifest must not point the engine at files outside its folder.
            if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                raise EngineError(f"{where}: graphs.{name}.{file_key} is {fname!r}, not a file name in the folder; "
                                  f"{rebuild_hint}")
            path = folder / fname
            if not path.is_file():
                raise EngineError(f"{path}: {name} graph file is missing; {rebuild_hint}")
            recorded = g.get(sha_key)
            if not isinstance(recorded, str):
                raise EngineError(f"{where}: no sha256 recorded for {path.name} (graphs.{name}.{sha_key}), so it "
                                  f"cannot be checked; {rebuild_hint}")
            actual = sha256_file(path)
            if actual != recorded:
                raise EngineError(f"{path}: sha256 {actual} differs from the {recorded} that {MANIFEST_FILE} records "
                                  f"for the {name} graph (the file was replaced, swapped or edited); {rebuild_hint}")
        paths[name] = folder / g["file"]
    return paths


def load_graph_folder(folder: str | Path, bundle: Bundle, rebuild_hint: str) -> tuple[dict, dict[str, Path]]:
    """What an engine checks before loading a folder: its manifest, that the graphs come from
    ``bundle``'s weights and passed parity, and every file's hash; returns the manifest and each
    graph's path."""
    manifest = read_manifest(folder, rebuild_hint)
    check_sources(manifest, bundle, folder, rebuild_hint)
    return manifest, check_graph_files(manifest, folder, rebuild_hint)
