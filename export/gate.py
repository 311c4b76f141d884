"""The gate a reduced-precision graph must pass against fp32 (int8: :mod:`export.int8`; bf16:
:mod:`export.bf16`): per parity image, final-mask Dice against fp32's masks; on the validation
set, mDice against the ground truth within a margin of fp32's.

:func:`select_graphs` applies it graph by graph: each candidate swapped in alone (the other graphs
fp32), then the graphs that held all together (errors add up), dropping the weakest until the
mixed set passes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cp_deploy.bundle import Bundle
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.metrics import dice
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export.onnx import write_manifest

BATCH = 4  # images per pipeline call in gate runs


@dataclass
class Gate:
    """What a reduced-precision graph must keep against fp32: per image final-mask Dice, and validation mDice."""

    min_dice: float = 0.98
    max_mdice_drop: float = 0.005

    def to_json(self) -> dict:
        return {"min_dice": self.min_dice, "max_mdice_drop": self.max_mdice_drop}


@dataclass
class GateImages:
    """The images the gate runs on: named parity images, and validation images with their masks."""

    names: list[str]
    images: list[np.ndarray]
    val_names: list[str] = field(default_factory=list)
    val_images: list[np.ndarray] = field(default_factory=list)
    val_masks: list[np.ndarray] = field(default_factory=list)


@dataclass
class Verdict:
    """One graph's (or the mixed set's) gate figures, and why it failed (``None``: passed).

    ``dice_*`` are per parity image against fp32's masks (the per-image rule); ``val_*`` are
    validation mDice against the ground truth, the candidate's and fp32's, and, for information, the least
    per-image Dice against fp32 there."""

    dice_min: float
    dice_mean: float
    worst_image: str
    val_mdice: float | None = None
    val_mdice_fp32: float | None = None
    val_dice_min: float | None = None
    val_worst_image: str | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        if not self.worst_image:  # never gated: only the reason
            return {"reason": self.reason}
        out = {"dice_min": round(self.dice_min, 5), "dice_mean": round(self.dice_mean, 5),
               "worst_image": self.worst_image}
        if self.val_mdice is not None:
            out.update(val_mdice=round(self.val_mdice, 5), val_mdice_fp32=round(self.val_mdice_fp32, 5),
                       val_dice_min=round(self.val_dice_min, 5), val_worst_image=self.val_worst_image)
        return out if self.reason is None else {**out, "reason": self.reason}


class MixedEngine(GraphEngine):
    """The graphs of ``base``, except those in ``swap``, which run on ``other`` (same tensors).

    ``memo`` caches ``base``'s outputs by the hash of their feeds: a swapped graph changes only
    what runs after it, so gate runs recompute only those stages. ``record`` is called with every
    graph call's name and host feeds.
    """

    def __init__(self, base: GraphEngine, other: GraphEngine | None = None, swap: tuple[str, ...] = (),
                 memo: dict | None = None, record: Callable[[str, dict[str, np.ndarray]], None] | None = None) -> None:
        self.base, self.other, self.swap = base, other, tuple(swap)
        self.manifest, self.device, self.mask_size = base.manifest, base.device, base.mask_size
        self.memo, self.record = memo, record

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.record is not None:
            self.record(graph, self.numpy_feeds(graph, feeds))
        if graph in self.swap:
            return self.other.run(graph, feeds)
        if self.memo is None:
            return self.base.run(graph, feeds)
        h = hashlib.sha1(graph.encode())
        for name, x in sorted(self.numpy_feeds(graph, feeds).items()):
            h.update(name.encode() + str(x.shape).encode() + np.ascontiguousarray(x).tobytes())
        key = h.hexdigest()
        if key not in self.memo:
            self.memo[key] = self.base.run(graph, feeds)
        return [y.clone() for y in self.memo[key]]  # the pipeline's own tensors, never the cache's


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a graph staged beside its folder costs no space), else a copy."""
    try:
        os.link(src, dst)
    except OSError:  # another file system or no hard links there
        shutil.copyfile(src, dst)


def stage_folder(folder: Path, stage: Path, manifest: dict, replaced: dict | None = None,
                 source: Path | None = None) -> Path:
    """``stage`` as a graph folder: ``folder``'s graph files (hard links) under ``manifest``, with
    the ``replaced`` graphs' entries and their files (linked from ``source``, or already in
    ``stage``) instead."""
    stage.mkdir(parents=True, exist_ok=True)
    replaced = replaced or {}
    for name, entry in {**manifest["graphs"], **replaced}.items():
        origin = (source if name in replaced else folder)
        for f in (entry["file"], entry.get("external_data")):
            if f and origin is not None and not (stage / f).exists():
                link_or_copy(origin / f, stage / f)
    write_manifest(stage, {**manifest, "graphs": {**manifest["graphs"], **replaced}})
    return stage


def install_graphs(folder: Path, stage: Path, old: dict, new: dict, kept: list[str]) -> None:
    """Move the files of ``new``'s ``kept`` graphs from ``stage`` into ``folder``, write ``new`` as
    its manifest, then remove the files of ``old`` they replace: a run stopped at any point leaves
    a manifest whose files are all there."""
    for name in kept:
        entry = new["graphs"][name]
        for f in (entry.get("external_data"), entry["file"]):  # the graph last: it names its data file
            if f:
                os.replace(stage / f, folder / f)
    write_manifest(folder, new)
    for name in kept:
        for f in (old["graphs"][name]["file"], old["graphs"][name].get("external_data")):
            if f:
                (folder / f).unlink(missing_ok=True)


def pipeline_masks(bundle: Bundle, engine: GraphEngine, images: list[np.ndarray],
                   batch: int = BATCH) -> list[np.ndarray]:
    """The curriculum's final masks of ``images`` on ``engine``."""
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="curriculum"))
    return [r.mask for i in range(0, len(images), batch) for r in pipe.predict(images[i:i + batch])]


def judge(ref: list[np.ndarray], got: list[np.ndarray], images: GateImages, gate: Gate,
          ref_val: list[np.ndarray], got_val: list[np.ndarray]) -> Verdict:
    """The gate's figures of ``got`` masks against fp32's ``ref`` (parity images; ``*_val`` on the
    validation images), and its reason to refuse: a parity image under ``gate.min_dice``, or
    validation mDice more than ``gate.max_mdice_drop`` below fp32's."""
    dices = [dice(g, r) for g, r in zip(got, ref)]
    worst = int(np.argmin(dices))
    v = Verdict(float(dices[worst]), float(np.mean(dices)), images.names[worst])
    if images.val_masks:
        v.val_mdice = float(np.mean([dice(g, m) for g, m in zip(got_val, images.val_masks)]))
        v.val_mdice_fp32 = float(np.mean([dice(r, m) for r, m in zip(ref_val, images.val_masks)]))
        val_dices = [dice(g, r) for g, r in zip(got_val, ref_val)]
        v.val_dice_min = float(np.min(val_dices))
        v.val_worst_image = images.val_names[int(np.argmin(val_dices))]
    if v.dice_min < gate.min_dice:
        v.reason = f"min Dice {v.dice_min:.4f} < {gate.min_dice} on image {v.worst_image}"
    elif v.val_mdice is not None and v.val_mdice_fp32 - v.val_mdice > gate.max_mdice_drop:
        v.reason = (f"validation mDice {v.val_mdice:.4f} is {v.val_mdice_fp32 - v.val_mdice:.4f} below fp32's "
                    f"{v.val_mdice_fp32:.4f} (more than {gate.max_mdice_drop})")
    return v


def verdict_line(v: Verdict, fallback: str = "fp32") -> str:
    val = "" if v.val_mdice is None else (f", validation mDice {v.val_mdice:.4f} (fp32 {v.val_mdice_fp32:.4f}; "
                                          f"least Dice to fp32 {v.val_dice_min:.4f})")
    return (f"min Dice {v.dice_min:.4f} ({v.worst_image}), mean {v.dice_mean:.4f}{val}: "
            + ("kept" if v.reason is None else f"stays {fallback}, {v.reason}"))


class Reference:
    """fp32's final masks on the gate's images, computed once; :meth:`verdict` judges another
    engine's against them. ``memo`` caches the fp32 graphs' outputs, so an engine that swaps a
    few graphs in (:meth:`swapped`) recomputes only the stages after them."""

    def __init__(self, bundle: Bundle, ref: GraphEngine, images: GateImages, gate: Gate) -> None:
        self.bundle, self.ref, self.images, self.gate, self.memo = bundle, ref, images, gate, {}
        base = MixedEngine(ref, memo=self.memo)
        self.masks = pipeline_masks(bundle, base, images.images)
        self.val_masks = pipeline_masks(bundle, base, images.val_images)

    def verdict(self, engine: GraphEngine) -> Verdict:
        got = pipeline_masks(self.bundle, engine, self.images.images)
        got_val = pipeline_masks(self.bundle, engine, self.images.val_images)
        return judge(self.masks, got, self.images, self.gate, self.val_masks, got_val)

    def swapped(self, cand: GraphEngine, swap: tuple[str, ...]) -> Verdict:
        """The verdict on fp32's graphs with those of ``swap`` running on ``cand``."""
        return self.verdict(MixedEngine(self.ref, cand, swap, memo=self.memo))


def select_graphs(reference: Reference, cand: GraphEngine, names: list[str], label: str, log: Callable[[str], None],
                  fallback: str = "fp32") -> tuple[dict[str, Verdict], list[str], Verdict | None]:
    """Gate each graph of ``names`` running on ``cand`` instead of the reference's, then the ones
    that held together; returns every verdict, the graphs kept, and the mixed set's verdict
    (``None`` with fewer than two kept). ``label`` names the precision in the log lines,
    ``fallback`` what a refused graph stays in."""
    verdicts: dict[str, Verdict] = {}
    for name in names:
        t0 = time.perf_counter()
        verdicts[name] = reference.swapped(cand, (name,))
        log(f"cp-export: {label} {name}: {verdict_line(verdicts[name], fallback)} ({time.perf_counter() - t0:.0f} s)")
    kept = [g for g in names if verdicts[g].reason is None]
    mixed = None
    while len(kept) > 1:
        mixed = reference.swapped(cand, tuple(kept))
        log(f"cp-export: {label} {'+'.join(kept)} together: {verdict_line(mixed, fallback)}")
        if mixed.reason is None:
            break
        weakest = min(kept, key=lambda g: verdicts[g].dice_min)
        kept.remove(weakest)
        verdicts[weakest].reason = (f"held alone, but with {', '.join(kept)} also {label} the mixed set failed: "
                                    f"{mixed.reason}")
        mixed = None
    return verdicts, kept, mixed
