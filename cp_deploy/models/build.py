"""Build the networks of a bundle, and write bundles (used by tests and by ``cp-train``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import BUNDLE_FILE, FORMAT_VERSION, Bundle, BundleError, load_bundle
from cp_deploy.models.detector import build_detector
from cp_deploy.models.keypoints import build_keypoint_net, keypoint_reads
from cp_deploy.models.sam import PromptHead, build_sam, default_preprocess, load_sam
from cp_deploy.models.weights import load_strict, read_state_dict, save_state_dict, sha256_file
from cp_deploy.preprocess import PreprocessConfig


@dataclass
class Models:
    """The five networks of the curriculum pipeline, all in eval mode on the CPU."""

    image_encoder: nn.Module
    box: PromptHead
    refine: PromptHead
    detector: nn.Module
    keypoints: nn.Module


def build_models(bundle: Bundle) -> Models:
    """Instantiate and strictly load every network a bundle names."""
    sam = load_sam(bundle.sam_arch, None if bundle.sam.file is None else str(bundle.sam.file), bundle.sam.sha256)
    heads = {}
    for name, ref in (("box", bundle.box_head), ("refine", bundle.refine_head)):
        head = PromptHead.from_sam(sam)
        if ref.file is not None:
            load_strict(head, read_state_dict(ref.file), source=str(ref.file))
        heads[name] = head.eval()
    stages = {}
    for name, spec, builder in (
        ("detector", bundle.detector, lambda a, c: build_detector(a, c, bundle.prompt.text, bundle.root)),
        ("keypoints", bundle.keypoints, build_keypoint_net),
    ):
        try:
            net = builder(spec.arch, spec.config)
        except (TypeError, ValueError) as e:  # a config key the constructor lacks, or a bad value
            raise BundleError(f"{bundle.root / BUNDLE_FILE}: '{name}.config' does not fit arch '{spec.arch}' "
                              f"({e}); fix or remove the key it names") from e
        if spec.file is not None:
            load_strict(net, read_state_dict(spec.file), source=str(spec.file))
        stages[name] = net.eval()
    return Models(sam.image_encoder.eval(), heads["box"], heads["refine"], stages["detector"], stages["keypoints"])


def stage_entry(arch: str, config: dict, reads: str, preprocess: dict | None = None) -> dict:
    entry = {"arch": arch, "reads": reads, "config": config}
    if preprocess is not None:
        entry["preprocess"] = preprocess
    return entry


def embedding_keypoint_config(channels: int, stride: int) -> dict:
    """Config of the small heatmap head on a SAM embedding of ``channels`` and ``stride``."""
    return {"in_channels": channels, "hidden": 64, "crop_size": 16, "spatial_scale": 1.0 / stride, "margin": 0.15}


def hrnet_keypoint_config(backbone: str = "hrnet_w32", crop_size: int = 256, head_channels: int = 128) -> dict:
    """Config of the HRNet keypoint net: 15% box margin, heatmaps of crop/4, target sigma 2 cells."""
    return {"backbone": backbone, "crop_size": crop_size, "head_channels": head_channels, "margin": 0.15,
            "sigma": 2.0}


def keypoint_entry(arch: str, config: dict, image_size: int) -> dict:
    """A keypoint net's bundle entry: ``hrnet`` reads the image, resized to ``image_size`` with
    ImageNet mean/std (timm's HRNet weights expect them, whatever the SAM's own normalization);
    ``embedding_heatmap`` reads the SAM embedding."""
    if keypoint_reads(arch) == "image":
        return stage_entry(arch, config, "image", PreprocessConfig(image_size=image_size).to_dict())
    return stage_entry(arch, config, "embedding")


def write_bundle(
    out: str | Path,
    spec: dict,
    weights: dict[str, nn.Module | dict | None],
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
        elif key in ("box", "refine"):
            spec.setdefault("heads", {})[key] = {"file": fname, "sha256": sha}
        else:
            spec[key].update({"file": fname, "sha256": sha})
    _record_hashes(out, spec)
    tmp = out / (BUNDLE_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(out / BUNDLE_FILE)
    return load_bundle(out)


def _record_hashes(root: Path, spec: dict) -> None:
    """Fill in the sha256 of every weight file ``spec`` names without one (a kept checkpoint,
    a copied file): loading refuses weight files whose hash is not recorded."""
    entries = [(spec.get("sam") or {}, "checkpoint")]
    entries += [(e, "file") for e in (spec.get("heads") or {}).values() if isinstance(e, dict)]
    entries += [(spec[k], "file") for k in ("detector", "keypoints") if isinstance(spec.get(k), dict)]
    for entry, key in entries:
        name = entry.get(key)
        if isinstance(name, str) and entry.get("sha256") is None:
            path = Path(name) if Path(name).is_absolute() else root / name
            if path.is_file():
                entry["sha256"] = sha256_file(path)


def embedding_shape(sam_arch: str) -> tuple[int, int]:
    """(channels, side) of the SAM image embedding."""
    sam = build_sam(sam_arch)
    return sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size[0]


def init_bundle(
    out: str | Path,
    sam_arch: str = "tiny",
    sam_checkpoint: str | None = None,
    seed: int = 0,
    name: str | None = None,
    prompt: dict | None = None,
    gdino: dict | None = None,
    detector_size: int = 800,
    keypoints: tuple[str, dict] | None = None,
) -> Bundle:
    """A bundle with seeded random detector and keypoint heads on the embedding.

    The SAM weights come from ``sam_checkpoint`` (recorded with its absolute path and sha256, or
    LiteMedSAM's package); without a checkpoint
    a vit_h/l/b/tiny SAM is seeded random too and saved into the bundle (speed does not depend on
    the values). The box and refine heads start as the base
    SAM's own prompt encoder and mask decoder. With ``gdino`` (a ``GroundingDinoConfig`` as a
    dict; ``{}`` is the public Swin-T model's size) the detector is instead a seeded random
    Grounding DINO on ``detector_size`` px images, with a synthetic ``vocab.txt`` in the bundle.
    ``keypoints`` (arch, config) replaces the default keypoint head on the embedding, e.g.
    ``("hrnet", {"backbone": "hrnet_w18_small", ...})``.
    """
    torch.manual_seed(seed)
    channels, side = embedding_shape(sam_arch)
    pre = default_preprocess(sam_arch)
    stride = pre.image_size // side
    weights: dict = {}
    # An absolute path: the bundle.json must not depend on the directory init_bundle ran in.
    checkpoint = None if sam_checkpoint is None else str(Path(sam_checkpoint).resolve())
    sam_entry: dict = {"arch": sam_arch, "checkpoint": checkpoint}
    if sam_arch != "lite_medsam" and sam_checkpoint is None:  # seeded random SAM (tests, speed checks)
        weights["sam"] = build_sam(sam_arch)
    text = {"text": "polyp", **(prompt or {})}["text"]
    if gdino is None:
        det_cfg = {"in_channels": channels, "hidden": 64, "stride": stride}
        detector = build_detector("embedding_centernet", det_cfg)
        det_entry = stage_entry("embedding_centernet", det_cfg, "embedding")
    else:
        from cp_deploy.models.grounding_dino import write_synthetic_vocab

        Path(out).mkdir(parents=True, exist_ok=True)
        write_synthetic_vocab(Path(out) / "vocab.txt", gdino.get("text_config", {}).get("vocab_size", 30522))
        det_cfg = {"model_config": gdino, "tokenizer": "vocab.txt"}
        detector = build_detector("grounding_dino", det_cfg, text, out)
        det_pre = PreprocessConfig(image_size=detector_size, normalize="meanstd").to_dict()
        det_entry = stage_entry("grounding_dino", det_cfg, "image", det_pre)
    kp_arch, kp_cfg = keypoints or ("embedding_heatmap", embedding_keypoint_config(channels, stride))
    weights.update(detector=detector, keypoints=build_keypoint_net(kp_arch, kp_cfg))
    spec = {
        "name": name or f"{sam_arch}-random-{seed}",
        "sam": sam_entry,
        "preprocess": pre.to_dict(),
        "heads": {"box": None, "refine": None},
        "detector": det_entry,
        "keypoints": keypoint_entry(kp_arch, kp_cfg, pre.image_size),
        "prompt": {"text": "polyp", "mode": "all", "score_threshold": 0.3, "nms_iou": 0.5,
                   "max_instances": 5, "edge_label": "negative", **(prompt or {})},
        "metadata": {"trained": False, "seed": seed},
    }
    return write_bundle(out, spec, weights)
