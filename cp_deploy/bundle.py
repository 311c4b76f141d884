"""The bundle: one directory with ``bundle.json`` and the weights ``cp-deploy`` needs.

This module parses and validates ``bundle.json`` and checks that every file it names exists and
has the recorded sha256. Errors name the file and the key. Building the networks from a bundle
is ``cp_deploy.models.build``'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cp_deploy.preprocess import PreprocessConfig

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
PROMPT_MODES = ("curriculum", "box", "points", "box+points", "box+mask")
EDGE_LABELS = {"negative": 0, "positive": 1}


class BundleError(RuntimeError):
    """A bundle is missing, malformed, or one of its files is missing or corrupt."""


@dataclass
class StageSpec:
    """A detector or keypoint net: its builder name, constructor config, weights and input."""

    arch: str
    config: dict
    reads: str
    file: Path | None
    sha256: str | None
    preprocess: PreprocessConfig | None = None


@dataclass
class WeightRef:
    file: Path | None
    sha256: str | None


@dataclass
class PromptSettings:
    text: str = "polyp"
    mode: str = "all"  # "all" instances or the "top1" best
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_instances: int = 5
    # Keep the best box(es) even under the threshold: for data where every image holds a lesion.
    min_instances: int = 0
    edge_label: str = "negative"


@dataclass
class Bundle:
    root: Path
    name: str
    sam_arch: str
    sam: WeightRef
    preprocess: PreprocessConfig
    box_head: WeightRef
    refine_head: WeightRef
    detector: StageSpec
    keypoints: StageSpec
    prompt: PromptSettings
    metadata: dict = field(default_factory=dict)


def default_bundle_path() -> Path:
    """The bundle that ships inside the package (used when ``--bundle`` is not given)."""
    return Path(__file__).resolve().parent / "bundles" / "default"


def _get(d: dict, key: str, where: str, kind: type | tuple = object):
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"{where}: missing key '{key}'")
    value = d[key]
    if kind is not object and not isinstance(value, kind):
        raise BundleError(f"{where}: key '{key}' must be {kind}, got {type(value).__name__}")
    return value


def _weight(root: Path, entry: dict | None, where: str, key: str) -> WeightRef:
    """Resolve and check one weight file (``None`` means: take it from the base model)."""
    if entry is None or entry.get("file") is None:
        return WeightRef(None, None)
    path = Path(entry["file"])
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise BundleError(f"{where}: file '{path}' named by key '{key}.file' does not exist")
    sha = entry.get("sha256")
    if sha is not None:
        from cp_deploy.models.weights import sha256_file

        actual = sha256_file(path)
        if actual != sha:
            raise BundleError(
                f"{where}: file '{path}' (key '{key}.file') has sha256 {actual}, but '{key}.sha256' "
                f"records {sha}; the file is corrupt or was replaced: restore it or rebuild the bundle"
            )
    return WeightRef(path, sha)


def _stage(root: Path, d: dict, key: str, where: str) -> StageSpec:
    entry = _get(d, key, where, dict)
    reads = _get(entry, "reads", f"{where} [{key}]", str)
    if reads not in ("image", "embedding"):
        raise BundleError(f"{where}: '{key}.reads' must be 'image' or 'embedding', got {reads!r}")
    w = _weight(root, entry, where, key)
    pre = entry.get("preprocess")
    return StageSpec(
        arch=_get(entry, "arch", f"{where} [{key}]", str),
        config=dict(entry.get("config", {})),
        reads=reads,
        file=w.file,
        sha256=w.sha256,
        preprocess=PreprocessConfig.from_dict(pre) if pre else None,
    )


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Parse and check a bundle directory (or its ``bundle.json``); ``None`` means the default."""
    root = Path(path) if path is not None else default_bundle_path()
    if root.name == BUNDLE_FILE:
        root = root.parent
    cfg_path = root / BUNDLE_FILE
    if not root.exists():
        raise BundleError(f"bundle directory '{root}' does not exist; pass --bundle DIR with a bundle.json")
    if not cfg_path.is_file():
        raise BundleError(f"'{cfg_path}' is missing: a bundle directory must contain bundle.json")
    where = str(cfg_path)
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: not valid JSON ({e})") from e
    version = _get(d, "format_version", where, int)
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {version} is not supported (this cp-deploy reads {FORMAT_VERSION})")
    sam = _get(d, "sam", where, dict)
    from cp_deploy.models.sam import SAM_ARCHS

    arch = _get(sam, "arch", f"{where} [sam]", str)
    if arch not in SAM_ARCHS:
        raise BundleError(f"{where}: 'sam.arch' is {arch!r}; expected one of {', '.join(SAM_ARCHS)}")
    if arch != "lite_medsam" and sam.get("checkpoint") is None:
        raise BundleError(f"{where}: 'sam.checkpoint' is required for {arch} (path to the official checkpoint)")
    heads = d.get("heads", {}) or {}
    prompt = PromptSettings(**d.get("prompt", {}))
    if prompt.mode not in ("all", "top1"):
        raise BundleError(f"{where}: 'prompt.mode' must be 'all' or 'top1', got {prompt.mode!r}")
    if prompt.edge_label not in EDGE_LABELS:
        raise BundleError(f"{where}: 'prompt.edge_label' must be 'negative' or 'positive'")
    return Bundle(
        root=root,
        name=d.get("name", root.name),
        sam_arch=arch,
        sam=_weight(root, {"file": sam.get("checkpoint"), "sha256": sam.get("sha256")}, where, "sam"),
        preprocess=PreprocessConfig.from_dict(_get(d, "preprocess", where, dict)),
        box_head=_weight(root, heads.get("box"), where, "heads.box"),
        refine_head=_weight(root, heads.get("refine"), where, "heads.refine"),
        detector=_stage(root, d, "detector", where),
        keypoints=_stage(root, d, "keypoints", where),
        prompt=prompt,
        metadata=dict(d.get("metadata", {})),
    )
