"""The bundle: one directory with ``bundle.json`` and the weights ``cp-deploy`` needs.

The format's one home: parsing and validating ``bundle.json`` (known keys only, each of its type
and range; every weight file inside the bundle, except that the SAM checkpoint may be an absolute
path, present and matching its recorded sha256), writing a bundle, deriving one from a base with
some stages replaced, and copying one without its weights. Errors name the file and the key.
Building the networks from a bundle is ``cp_deploy.models.build``'s job.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from cp_deploy.errors import BundleError
from cp_deploy.files import atomic_write_bytes
from cp_deploy.models.weights import save_state_dict, sha256_file
from cp_deploy.preprocess import PreprocessConfig

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
# The SAM architectures a bundle may name (cp_deploy.models.sam builds each).
SAM_ARCHS = ("vit_h", "vit_l", "vit_b", "tiny", "lite_medsam")
EDGE_LABELS = {"negative": 0, "positive": 1}
# The keys each section may hold; anything else is a typo that would otherwise be ignored.
TOP_KEYS = ("format_version", "name", "sam", "preprocess", "heads", "detector", "keypoints", "prompt", "metadata")
SAM_KEYS = ("arch", "checkpoint", "sha256")
HEAD_NAMES = ("box", "refine")
HEAD_KEYS = ("file", "sha256")
STAGE_KEYS = ("arch", "reads", "config", "file", "sha256", "preprocess")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


_KINDS = {dict: "an object", str: "a string", int: "an integer", list: "a list"}


def _get(d: dict, key: str, where: str, kind: type | tuple = object):
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"{where}: missing key '{key}'")
    value = d[key]
    if kind is not object and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
        raise BundleError(f"{where}: key '{key}' must be {_KINDS.get(kind, kind)}, got {type(value).__name__} "
                          f"{value!r}"[:300])
    return value


def _no_unknown_keys(d: dict, allowed: tuple[str, ...], section: str, where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        inside = f" in '{section}'" if section else ""
        raise BundleError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}{inside}; expected "
                          f"{', '.join(allowed)}: remove or rename them")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after resolving symlinks and ``..``) lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop leads nowhere inside
        return False


def _weight(root: Path, file: object, sha: object, where: str, file_key: str, sha_key: str,
            absolute_ok: bool = False) -> WeightRef:
    """Resolve and hash-check one weight file (``file`` ``None``: take it from the base model).

    A bundle is a folder that can be handed around: its files must stay inside it, so a crafted
    ``../../`` path cannot make cp-deploy open files elsewhere. Only the SAM checkpoint may be an
    absolute path (Meta's multi-GB ``.pth`` is rarely copied into each bundle). Every file needs
    its sha256: one without would be loaded unchecked.
    """
    if file is None:
        return WeightRef(None, None)
    if not isinstance(file, str) or not file:
        raise BundleError(f"{where}: key '{file_key}' must be a file name (a string) or null, got {file!r}")
    path = Path(file)
    if path.is_absolute():
        if not absolute_ok:
            raise BundleError(f"{where}: key '{file_key}' is the absolute path '{file}'; weight files must lie "
                              f"inside the bundle: copy the file into '{root}' and name it relative to it")
    else:
        path = root / path
        if not _inside(path, root):
            raise BundleError(f"{where}: key '{file_key}' names '{file}', which lies outside the bundle '{root}'; "
                              "copy the file into the bundle and name it relative to it")
    if not path.is_file():
        raise BundleError(f"{where}: file '{path}' named by key '{file_key}' does not exist")
    if sha is None:
        raise BundleError(f"{where}: key '{sha_key}' is missing for '{path}', and every weight file needs its hash; "
                          f"record it: run 'sha256sum {path}' and put its 64 hex digits into '{sha_key}'")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise BundleError(f"{where}: key '{sha_key}' is {sha!r}, not a sha256 (64 lowercase hex digits); "
                          f"record it with: sha256sum {path}")
    actual = sha256_file(path)
    if actual != sha:
        raise BundleError(
            f"{where}: file '{path}' (key '{file_key}') has sha256 {actual}, but '{sha_key}' "
            f"records {sha}; the file is corrupt or was replaced: restore it or rebuild the bundle"
        )
    return WeightRef(path, sha)


def _preprocess(d: object, section: str, where: str) -> PreprocessConfig:
    try:
        return PreprocessConfig.from_dict(d, section)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from e


def _stage(root: Path, d: dict, key: str, where: str) -> StageSpec:
    """One stage entry. Whether its arch is known and reads what the entry says is checked where
    the networks are built (``cp_deploy.models.build.stage_families``), which knows the families."""
    entry = _get(d, key, where, dict)
    _no_unknown_keys(entry, STAGE_KEYS, key, where)
    arch = _get(entry, "arch", f"{where} [{key}]", str)
    reads = _get(entry, "reads", f"{where} [{key}]", str)
    if reads not in ("image", "embedding"):
        raise BundleError(f"{where}: '{key}.reads' must be 'image' or 'embedding', got {reads!r}")
    config = entry.get("config", {})
    if not isinstance(config, dict):
        raise BundleError(f"{where}: '{key}.config' must be an object (the net's constructor arguments), "
                          f"got {type(config).__name__}")
    w = _weight(root, entry.get("file"), entry.get("sha256"), where, f"{key}.file", f"{key}.sha256")
    pre = entry.get("preprocess")
    return StageSpec(
        arch=arch,
        config=dict(config),
        reads=reads,
        file=w.file,
        sha256=w.sha256,
        preprocess=_preprocess(pre, f"{key}.preprocess", where) if pre is not None else None,
    )


def _number(p: dict, key: str, where: str, lo: float, hi: float, lo_open: bool = False) -> None:
    v = p[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise BundleError(f"{where}: 'prompt.{key}' is {v!r}; expected a number in {lo_s}, {hi}]")


def _count(p: dict, key: str, where: str, lo: int) -> None:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BundleError(f"{where}: 'prompt.{key}' is {v!r}; expected an integer >= {lo}")


def _prompt(d: object, where: str) -> PromptSettings:
    """Prompt settings with every field of its type and range (a wrong one would fail every image
    later, or worse, silently select nothing)."""
    if not isinstance(d, dict):
        raise BundleError(f"{where}: key 'prompt' must be an object, got {type(d).__name__}")
    _no_unknown_keys(d, tuple(f.name for f in fields(PromptSettings)), "prompt", where)
    p = {**PromptSettings().__dict__, **d}
    if not isinstance(p["text"], str) or not p["text"].strip():
        raise BundleError(f"{where}: 'prompt.text' is {p['text']!r}; expected a non-empty string, e.g. 'polyp'")
    if p["mode"] not in ("all", "top1"):
        raise BundleError(f"{where}: 'prompt.mode' must be 'all' or 'top1', got {p['mode']!r}")
    _number(p, "score_threshold", where, 0, 1)
    _number(p, "nms_iou", where, 0, 1, lo_open=True)
    _count(p, "max_instances", where, 1)
    _count(p, "min_instances", where, 0)
    if p["min_instances"] > p["max_instances"]:
        raise BundleError(f"{where}: 'prompt.min_instances' ({p['min_instances']}) exceeds 'prompt.max_instances' "
                          f"({p['max_instances']}); lower it or raise max_instances")
    if p["edge_label"] not in EDGE_LABELS:
        raise BundleError(f"{where}: 'prompt.edge_label' must be 'negative' or 'positive', got {p['edge_label']!r}")
    return PromptSettings(**p)


def _heads(root: Path, d: dict, where: str) -> dict[str, WeightRef]:
    heads = d.get("heads") or {}
    if not isinstance(heads, dict):
        raise BundleError(f"{where}: key 'heads' must be an object with 'box' and 'refine', "
                          f"got {type(heads).__name__}")
    _no_unknown_keys(heads, HEAD_NAMES, "heads", where)
    out = {}
    for name in HEAD_NAMES:
        entry = heads.get(name) or {}
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: 'heads.{name}' must be an object with 'file' and 'sha256', or null "
                              f"(the base SAM's own head), got {type(entry).__name__}")
        _no_unknown_keys(entry, HEAD_KEYS, f"heads.{name}", where)
        out[name] = _weight(root, entry.get("file"), entry.get("sha256"), where, f"heads.{name}.file",
                            f"heads.{name}.sha256")
    return out


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise BundleError(f"{where}: must hold a JSON object, got {type(d).__name__}")
    version = _get(d, "format_version", where, int)
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {version} is not supported (this cp-deploy reads {FORMAT_VERSION})")
    _no_unknown_keys(d, TOP_KEYS, "", where)
    name = d.get("name", root.name)
    if not isinstance(name, str):
        raise BundleError(f"{where}: key 'name' must be a string, got {type(name).__name__}")
    metadata = d.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BundleError(f"{where}: key 'metadata' must be an object, got {type(metadata).__name__}")
    sam = _get(d, "sam", where, dict)
    _no_unknown_keys(sam, SAM_KEYS, "sam", where)
    arch = _get(sam, "arch", f"{where} [sam]", str)
    if arch not in SAM_ARCHS:
        raise BundleError(f"{where}: 'sam.arch' is {arch!r}; expected one of {', '.join(SAM_ARCHS)}")
    if arch != "lite_medsam" and sam.get("checkpoint") is None:
        raise BundleError(f"{where}: 'sam.checkpoint' is required for {arch} (path to the official checkpoint)")
    prompt = _prompt(d.get("prompt", {}), where)
    preprocess = _preprocess(_get(d, "preprocess", where, dict), "preprocess", where)
    heads = _heads(root, d, where)
    return Bundle(
        root=root,
        name=name,
        sam_arch=arch,
        sam=_weight(root, sam.get("checkpoint"), sam.get("sha256"), where, "sam.checkpoint", "sam.sha256",
                    absolute_ok=True),
        preprocess=preprocess,
        box_head=heads["box"],
        refine_head=heads["refine"],
        detector=_stage(root, d, "detector", where),
        keypoints=_stage(root, d, "keypoints", where),
        prompt=prompt,
        metadata=dict(metadata),
    )


# Writing. A bundle is written as its weight files first, then bundle.json, each atomically, so
# a reader never sees a bundle.json whose files or hashes are not there yet.

STAGE_NAMES = ("detector", "keypoints")
Weights = nn.Module | Mapping[str, torch.Tensor]


def write_spec(bundle_dir: str | Path, spec: dict) -> None:
    """Write ``spec`` as ``bundle_dir``/bundle.json, atomically."""
    atomic_write_bytes(Path(bundle_dir) / BUNDLE_FILE, (json.dumps(spec, indent=2) + "\n").encode("utf-8"))


def write_bundle(
    out: str | Path,
    spec: dict,
    weights: Mapping[str, Weights | None],
    weight_dtype: torch.dtype | None = None,
) -> Bundle:
    """Write ``spec`` (a bundle.json without file entries) plus the given weights, then reload it.

    ``weights`` maps ``sam``, ``box``, ``refine``, ``detector`` and ``keypoints`` to a module or
    state dict to save as safetensors, or to ``None`` to keep what ``spec`` says (for example the
    base SAM's own heads, or a checkpoint path). ``weight_dtype`` is the storage precision.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(spec))
    spec["format_version"] = FORMAT_VERSION
    for key, obj in weights.items():
        if obj is None:
            continue
        fname = f"{key}.safetensors"
        sha = save_state_dict(obj, out / fname, dtype=weight_dtype)
        if key == "sam":
            spec["sam"].update({"checkpoint": fname, "sha256": sha})
        elif key in HEAD_NAMES:
            spec.setdefault("heads", {})[key] = {"file": fname, "sha256": sha}
        else:
            spec[key].update({"file": fname, "sha256": sha})
    _record_hashes(out, spec)
    write_spec(out, spec)
    return load_bundle(out)


def _record_hashes(root: Path, spec: dict) -> None:
    """Fill in the sha256 of every weight file ``spec`` names without one (a kept checkpoint,
    a copied file): loading refuses weight files whose hash is not recorded."""
    entries = [(spec.get("sam") or {}, "checkpoint")]
    entries += [(e, "file") for e in (spec.get("heads") or {}).values() if isinstance(e, dict)]
    entries += [(spec[k], "file") for k in STAGE_NAMES if isinstance(spec.get(k), dict)]
    for entry, key in entries:
        name = entry.get(key)
        if isinstance(name, str) and entry.get("sha256") is None:
            path = Path(name) if Path(name).is_absolute() else root / name
            if path.is_file():
                entry["sha256"] = sha256_file(path)


def read_spec(bundle: Bundle | str | Path) -> dict:
    """The raw bundle.json of a bundle (or bundle directory), as a dict."""
    root = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
    return json.loads((root / BUNDLE_FILE).read_text())


def derive_bundle(base: Bundle, out: str | Path, replace: dict[str, tuple[dict | None, Weights]],
                  metadata: dict | None = None, prompt: dict | None = None) -> Bundle:
    """Copy ``base`` to ``out`` with some stages replaced.

    ``replace`` maps ``detector``, ``keypoints``, ``box`` or ``refine`` to (new bundle.json entry
    or ``None`` to keep the entry, weights). Files of the stages kept are copied with their hashes.
    ``metadata`` updates the base's; a key given as ``None`` is removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_spec(base)
    for key in STAGE_NAMES:
        entry = spec[key]
        if key in replace:
            if replace[key][0] is not None:
                spec[key] = dict(replace[key][0])
            spec[key].pop("file", None)
            spec[key].pop("sha256", None)
        elif entry.get("file"):
            _copy_file(base.root / entry["file"], out)
    heads = spec.setdefault("heads", {})
    for key in HEAD_NAMES:
        entry = heads.get(key)
        if key in replace:
            heads[key] = None
        elif entry and entry.get("file"):
            _copy_file(base.root / entry["file"], out)
    sam = spec["sam"]
    if sam.get("checkpoint") and not Path(sam["checkpoint"]).is_absolute():
        _copy_file(base.root / sam["checkpoint"], out)
    meta = spec.setdefault("metadata", {})
    for k, v in (metadata or {}).items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    spec.setdefault("prompt", {}).update(prompt or {})
    # fp16 storage halves the bundle; the networks run in the engine's own precision.
    return write_bundle(out, spec, {k: v[1] for k, v in replace.items()}, weight_dtype=torch.float16)


def update_spec(bundle_dir: str | Path, section: str, values: dict) -> None:
    """Merge ``values`` into ``section`` (e.g. ``prompt``, ``metadata``) of a written bundle's
    bundle.json, atomically; weights and their hashes are untouched."""
    spec = read_spec(bundle_dir)
    spec.setdefault(section, {}).update(values)
    write_spec(bundle_dir, spec)


def weightless_copy(out: str | Path, src: str | Path | None = None) -> Bundle:
    """Write ``out``/bundle.json: ``src``'s (default: the shipped bundle) with no head, detector or
    keypoint file, so each stage starts from its base model.

    A base for training a detector validated on its boxes, which reads none of those weights: the
    copy is one small file where the full bundle carries tens of MB.
    """
    spec = read_spec(src if src is not None else default_bundle_path())
    spec["heads"] = {}
    for key in STAGE_NAMES:
        spec[key].pop("file", None)
        spec[key].pop("sha256", None)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_spec(out, spec)
    return load_bundle(out)


def _copy_file(src: Path, out_dir: Path) -> None:
    dst = out_dir / src.name
    if src.resolve() != dst.resolve():
        shutil.copy2(src, dst)
