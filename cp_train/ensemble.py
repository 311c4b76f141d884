"""Fuse the detectors (or keypoint nets) of several trained bundles into one bundle, and re-tune
the fused detector's thresholds on validation (``cp-train ensemble``).

Every member must hold a single net of the stage, all of one family, config and preprocessing
(train them with ``cp-train`` and different seeds or recipes; ``--val-seed`` keeps the validation
split, ``--keypoint-init fresh`` starts a keypoint member afresh), of a family that can ensemble
(its ``ensemble``, e.g. CenterNet's averaged maps or the keypoint nets' averaged heatmap logits):
one graph and one decode, so thresholds, NMS, export and every engine work as for one net, at N
times its cost. Averaged detector probabilities are calibrated differently from one member's, so
:func:`tune` picks the score threshold and minimum instance count again on the validation split
that ``cp-train`` carves, never on test data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cp_deploy.bundle import Bundle, derive_bundle
from cp_deploy.models.build import build_models, stage_entry
from cp_deploy.models.registry import detector_families, detector_family, keypoint_families, keypoint_family
from cp_deploy.models.weights import read_state_dict
from cp_train.data import Dataset, EmbeddingCache
from cp_train.validate import ValidationSet, tune_detection

FAMILIES = {"detector": (detector_family, detector_families), "keypoints": (keypoint_family, keypoint_families)}


def ensemble_bundles(members: list[Bundle], out: str | Path, stage: str = "detector", base: Bundle | None = None,
                     prompt: dict | None = None) -> Bundle:
    """Write ``out``: ``base`` (default ``members[0]``) with the members' ``stage`` (``detector``
    or ``keypoints``) fused into one ensemble (and ``prompt`` settings, e.g. a tuned score
    threshold, over the base's)."""
    if stage not in FAMILIES:
        raise ValueError(f"stage must be one of {', '.join(FAMILIES)}, got {stage!r}")
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two member bundles")
    lookup, families = FAMILIES[stage]
    fusable = " or ".join(n for n, f in families().items() if f.ensemble is not None)
    first = getattr(members[0], stage)
    key = _member_key(first, lookup)
    state = {}
    for i, b in enumerate(members):
        d = getattr(b, stage)
        if lookup(d.arch).ensemble is None or d.config.get("members", 1) != 1:
            raise ValueError(f"{b.root}: its {stage} is {d.arch!r} with {d.config.get('members', 1)} members; "
                             f"members must each be a single {fusable}")
        if _member_key(d, lookup) != key:
            raise ValueError(f"{b.root}: {stage} arch, config or preprocessing differs from {members[0].root}'s; "
                             "train every member with the same flags (e.g. --detector-size)")
        state.update({f"members.{i}.{k}": v for k, v in read_state_dict(d.file, d.sha256).items()})
    name, config, pre = key
    entry = stage_entry(name, {**first.config, "members": len(members)}, first.reads, pre)
    meta = {f"{stage}_ensemble": [Path(b.root).name for b in members]}
    return derive_bundle(base or members[0], out, {stage: (entry, state)}, metadata=meta, prompt=prompt)


def _member_key(spec, lookup) -> tuple:
    """What members must share: family (aliases resolved), config and preprocessing."""
    return lookup(spec.arch).name, spec.config, spec.preprocess.to_dict() if spec.preprocess else None


def tune(bundle: Bundle, data: Dataset, metric: str = "boxes") -> dict:
    """The prompt settings :func:`~cp_train.validate.tune_detection` picks for ``bundle``'s
    detector on the validation split carved from ``data``."""
    _, val_names = data.names()
    samples = data.load(val_names)
    models = build_models(bundle)
    val = ValidationSet(samples)
    if metric == "sam":
        cache = EmbeddingCache(data.cache_dir, bundle, models.image_encoder)
        with torch.no_grad():
            val = ValidationSet(samples, models, cache.fill(samples, progress=data.progress))
    return tune_detection(bundle, models.detector, val, metric)
