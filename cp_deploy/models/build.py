"""Build the networks of a bundle, and make seeded random bundles (tests, speed checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import BUNDLE_FILE, Bundle, write_bundle
from cp_deploy.errors import BundleError
from cp_deploy.models.families.grounding_dino import write_synthetic_vocab
from cp_deploy.models.registry import (
    BuildContext,
    DetectorFamily,
    KeypointFamily,
    build_detector,
    build_keypoint_net,
    detector_family,
    keypoint_family,
    with_flips,
)
from cp_deploy.models.sam import PromptHead, build_sam, default_preprocess, load_sam
from cp_deploy.models.weights import load_strict, read_state_dict
from cp_deploy.preprocess import PreprocessConfig


@dataclass
class Models:
    """The five networks of the curriculum pipeline, all in eval mode on the CPU."""

    image_encoder: nn.Module
    box: PromptHead
    refine: PromptHead
    detector: nn.Module
    keypoints: nn.Module


def stage_families(bundle: Bundle) -> tuple[DetectorFamily, KeypointFamily]:
    """The families of the bundle's detector and keypoint net; an unknown arch, or a ``reads`` that
    is not the family's, is a one-line :class:`BundleError` naming bundle.json and the key."""
    where = bundle.root / BUNDLE_FILE
    families = []
    for key, spec, lookup in (("detector", bundle.detector, detector_family),
                              ("keypoints", bundle.keypoints, keypoint_family)):
        try:
            family = lookup(spec.arch)
        except ValueError as e:
            raise BundleError(f"{where}: '{key}.arch': {e}") from e
        if family.reads != spec.reads:
            raise BundleError(f"{where}: '{key}.reads' is {spec.reads!r}, but {spec.arch} reads the {family.reads}; "
                              f"set it to {family.reads!r}")
        families.append(family)
    return families[0], families[1]


def build_models(bundle: Bundle) -> Models:
    """Instantiate and strictly load every network a bundle names."""
    stage_families(bundle)  # before SAM loads: a wrong arch fails in a moment
    # load_bundle has checked every file's sha256; hashing a multi-GB SAM checkpoint again here
    # would double the load time for nothing.
    sam = load_sam(bundle.sam_arch, None if bundle.sam.file is None else str(bundle.sam.file))
    heads = {}
    for name, ref in (("box", bundle.box_head), ("refine", bundle.refine_head)):
        head = PromptHead.from_sam(sam)
        if ref.file is not None:
            load_strict(head, read_state_dict(ref.file), source=str(ref.file))
        heads[name] = head.eval()
    stages = {}
    ctx = BuildContext(prompt_text=bundle.prompt.text, root=bundle.root)
    for name, spec, builder in (("detector", bundle.detector, build_detector),
                                ("keypoints", bundle.keypoints, build_keypoint_net)):
        try:
            net = builder(spec.arch, spec.config, ctx)
        except (TypeError, ValueError) as e:  # a config key the constructor lacks, or a bad value
            raise BundleError(f"{bundle.root / BUNDLE_FILE}: '{name}.config' does not fit arch '{spec.arch}' "
                              f"({e}); fix or remove the key it names") from e
        if spec.file is not None:
            load_strict(net, read_state_dict(spec.file), source=str(spec.file))
        if name == "detector":
            try:
                net = with_flips(spec.arch, net, spec.config)
            except ValueError as e:
                raise BundleError(f"{bundle.root / BUNDLE_FILE}: 'detector.config.flips': {e}") from e
        stages[name] = net.eval()
    return Models(sam.image_encoder.eval(), heads["box"], heads["refine"], stages["detector"], stages["keypoints"])


def stage_entry(arch: str, config: dict, reads: str, preprocess: dict | None = None) -> dict:
    """A detector or keypoints entry of bundle.json, without its weight file."""
    entry = {"arch": arch, "reads": reads, "config": config}
    if preprocess is not None:
        entry["preprocess"] = preprocess
    return entry


def family_entry(family: DetectorFamily | KeypointFamily, config: dict, image_size: int) -> dict:
    """A stage's bundle entry under the family's own name (never an alias): a family that reads
    the image gets it resized to ``image_size`` with ImageNet mean/std (what timm's backbone weights
    expect, whatever the SAM's own normalization); one that reads the SAM embedding needs none."""
    if family.reads == "image":
        return stage_entry(family.name, config, "image", PreprocessConfig(image_size=image_size).to_dict())
    return stage_entry(family.name, config, "embedding")


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
    detector: tuple[str, dict] | None = None,
) -> Bundle:
    """A bundle with seeded random detector and keypoint heads on the embedding.

    The SAM weights come from ``sam_checkpoint`` (recorded with its absolute path and sha256, or
    LiteMedSAM's package); without a checkpoint
    a vit_h/l/b/tiny SAM is seeded random too and saved into the bundle (speed does not depend on
    the values). The box and refine heads start as the base
    SAM's own prompt encoder and mask decoder. With ``gdino`` (a ``GroundingDinoConfig`` as a
    dict; ``{}`` is the public Swin-T model's size) the detector is instead a seeded random
    Grounding DINO on ``detector_size`` px images, with a synthetic ``vocab.txt`` in the bundle.
    ``detector`` and ``keypoints`` (arch, config) replace the default detector and keypoint head
    on the embedding, e.g. ``keypoints=("topdown_heatmap", {"backbone": "hrnet_w18_small", ...})``;
    a detector that reads the image gets ``detector_size`` px inputs.
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
    ctx = BuildContext(prompt_text={"text": "polyp", **(prompt or {})}["text"], root=Path(out))
    if gdino is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_synthetic_vocab(Path(out) / "vocab.txt", gdino.get("text_config", {}).get("vocab_size", 30522))
        detector = ("grounding_dino", {"model_config": gdino, "tokenizer": "vocab.txt"})
    det_arch, det_cfg = detector or ("embedding_centernet",
                                     detector_family("embedding_centernet").default_config(channels=channels,
                                                                                           stride=stride))
    kp_arch, kp_cfg = keypoints or ("embedding_heatmap",
                                    keypoint_family("embedding_heatmap").default_config(channels=channels,
                                                                                        stride=stride))
    weights.update(detector=build_detector(det_arch, det_cfg, ctx), keypoints=build_keypoint_net(kp_arch, kp_cfg, ctx))
    spec = {
        "name": name or f"{sam_arch}-random-{seed}",
        "sam": sam_entry,
        "preprocess": pre.to_dict(),
        "heads": {"box": None, "refine": None},
        "detector": family_entry(detector_family(det_arch), det_cfg, detector_size),
        "keypoints": family_entry(keypoint_family(kp_arch), kp_cfg, pre.image_size),
        "prompt": {"text": "polyp", "mode": "all", "score_threshold": 0.3, "nms_iou": 0.5,
                   "max_instances": 5, "edge_label": "negative", **(prompt or {})},
        "metadata": {"trained": False, "seed": seed},
    }
    return write_bundle(out, spec, weights)
