"""``python -m cp_train.ensemble``: fuse the detectors (or keypoint nets) of several trained
bundles into one bundle.

    python -m cp_train.ensemble --out ens/ run-a/ run-b/ run-c/ [--base BUNDLE] \
        [--data DIR --split FILE]   # re-tune the score threshold on the carved validation split
    python -m cp_train.ensemble --stage keypoints --out ens/ kp-a/ kp-b/ --base ens/

Every member must hold a single net of the stage, all of one arch, config and preprocessing
(train them with ``cp-train`` and different seeds or recipes; ``--val-seed`` keeps the validation
split, ``--keypoint-init fresh`` starts a keypoint member afresh). The new bundle is ``--base``
(default: the first member) with that stage replaced by the members' ensemble
(:class:`~cp_deploy.models.detector.CenterNetEnsemble`, which averages the CenterNet maps, or
:class:`~cp_deploy.models.keypoints.KeypointEnsemble`, which averages the heatmap logits): one
graph and one decode, so thresholds, NMS, export and every engine work as for one net, at N times
its cost. Averaged detector probabilities are calibrated differently from one member's, so with
``--data`` and ``--split`` the score threshold and minimum instance count are tuned again on the
validation split that ``cp-train`` carves from ``--split`` (same ``--val-fraction`` and
``--seed``), never on test data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cp_deploy.bundle import Bundle, BundleError, load_bundle
from cp_deploy.io import InputError
from cp_deploy.models.build import stage_entry
from cp_deploy.models.weights import WeightsError, read_state_dict
from cp_train.bundle_io import derive_bundle, update_spec
from cp_train.data import DataError

ENSEMBLE_ARCHS = {"detector": ("lite0_centernet", "embedding_centernet"),
                  "keypoints": ("hrnet", "embedding_heatmap")}


def ensemble_bundles(members: list[Bundle], out: str | Path, stage: str = "detector", base: Bundle | None = None,
                     prompt: dict | None = None) -> Bundle:
    """Write ``out``: ``base`` (default ``members[0]``) with the members' ``stage`` (``detector``
    or ``keypoints``) fused into one ensemble (and ``prompt`` settings, e.g. a tuned score
    threshold, over the base's)."""
    if stage not in ENSEMBLE_ARCHS:
        raise ValueError(f"stage must be one of {', '.join(ENSEMBLE_ARCHS)}, got {stage!r}")
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two member bundles")
    first = getattr(members[0], stage)
    pre = first.preprocess.to_dict() if first.preprocess else None
    state = {}
    for i, b in enumerate(members):
        d = getattr(b, stage)
        if d.arch not in ENSEMBLE_ARCHS[stage] or d.config.get("members", 1) != 1:
            raise ValueError(f"{b.root}: its {stage} is {d.arch!r} with {d.config.get('members', 1)} members; "
                             f"members must each be a single {' or '.join(ENSEMBLE_ARCHS[stage])}")
        d_pre = d.preprocess.to_dict() if d.preprocess else None
        if (d.arch, d.config, d_pre) != (first.arch, first.config, pre):
            raise ValueError(f"{b.root}: {stage} arch, config or preprocessing differs from {members[0].root}'s; "
                             "train every member with the same flags (e.g. --detector-size)")
        state.update({f"members.{i}.{k}": v for k, v in read_state_dict(d.file, d.sha256).items()})
    entry = stage_entry(first.arch, {**first.config, "members": len(members)}, first.reads, pre)
    meta = {f"{stage}_ensemble": [Path(b.root).name for b in members]}
    return derive_bundle(base or members[0], out, {stage: (entry, state)}, metadata=meta, prompt=prompt)


def tune(bundle: Bundle, data: str, split: str, val_fraction: float = 0.1, seed: int = 0,
         metric: str = "boxes", cache_dir: str | None = None) -> dict:
    """The prompt settings :func:`cp_train.cli.tune_detection` picks for ``bundle``'s detector on
    the validation split carved from ``split``."""
    import tempfile

    import torch

    from cp_deploy.models.build import build_models
    from cp_train.cli import tune_detection
    from cp_train.data import DEFAULT_CACHE_DIR, EmbeddingCache, carve_validation, load_samples, read_split

    _, val_names = carve_validation(read_split(split), val_fraction, seed)
    val = load_samples(data, val_names, progress=False)
    models = build_models(bundle)
    val_emb = None
    if metric == "sam":
        cache = EmbeddingCache(cache_dir or DEFAULT_CACHE_DIR, bundle, models.image_encoder)
        with torch.no_grad():
            val_emb = cache.fill(val, progress=False)
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "detector").mkdir()
        return tune_detection(bundle, models if metric == "sam" else None, models.detector, val, val_emb,
                              Path(work), metric=metric)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cp_train.ensemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", help="trained bundle directories whose nets to fuse")
    ap.add_argument("--stage", default="detector", choices=list(ENSEMBLE_ARCHS), help="which net to fuse")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--base", default=None, help="bundle to take every other stage from (default: the first member)")
    ap.add_argument("--data", default=None, help="dataset folder, to re-tune the score threshold on validation")
    ap.add_argument("--split", default=None, help="the training split the members were trained on (with --data)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as given to cp-train")
    ap.add_argument("--seed", type=int, default=0, help="as given to cp-train (it picks the validation split)")
    ap.add_argument("--val-metric", default="boxes", choices=["boxes", "sam"],
                    help="tune on the boxes' Dice (no SAM) or on the box pass's mDice")
    ap.add_argument("--cache-dir", default=None, help="embedding cache folder (--val-metric sam)")
    a = ap.parse_args(argv)
    if (a.data is None) != (a.split is None):
        ap.error("--data and --split go together")
    if a.data and a.stage != "detector":
        ap.error("--data/--split re-tune a detector's threshold; keypoints have none")
    try:
        members = [load_bundle(m) for m in a.members]
        bundle = ensemble_bundles(members, a.out, a.stage, load_bundle(a.base) if a.base else None)
        prompt = None
        if a.data and a.stage == "detector":
            prompt = tune(bundle, a.data, a.split, a.val_fraction, a.seed, a.val_metric, a.cache_dir)
            update_spec(a.out, "prompt", prompt)
    except (ValueError, BundleError, DataError, InputError, WeightsError) as e:
        print(f"cp_train.ensemble: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": a.out, "stage": a.stage, "members": len(members), "tuned": prompt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
