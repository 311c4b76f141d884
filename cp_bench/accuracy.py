"""The accuracy table: mDice / mIoU of a bundle on a split, for every prompt mode of the paper.

Embeddings come from the training cache (computed once per image with the bundle's encoder), so
all rows share one encoder pass per image. Rows: each prompt mode with detector boxes,
``curriculum`` with positive edge labels, and ``box``/``curriculum`` with ground-truth boxes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cp_deploy.bundle import Bundle
from cp_deploy.models.build import build_models
from cp_deploy.pipeline import PipelineOptions
from cp_train.data import EmbeddingCache, Sample, load_samples, read_split
from cp_train.evaluate import evaluate
from cp_train.shift import SHIFT_SUFFIX, domain_shift, shift_seed


@dataclass(frozen=True)
class Row:
    """One line of the table: the prompts, where the boxes come from, and the pipeline options."""

    prompts: str
    boxes: str  # "detector" or "GT boxes"
    options: dict = field(default_factory=dict)


ROWS = (
    Row("points", "detector", {"prompts": "points"}),
    Row("box", "detector", {"prompts": "box"}),
    Row("box+points", "detector", {"prompts": "box+points"}),
    Row("box+mask", "detector", {"prompts": "box+mask"}),
    Row("curriculum", "detector", {"prompts": "curriculum"}),
    Row("curriculum, positive edge labels", "detector", {"prompts": "curriculum", "edge_label": "positive"}),
    Row("box", "GT boxes", {"prompts": "box"}),
    Row("curriculum", "GT boxes", {"prompts": "curriculum"}),
)


def pick_rows(spec: str) -> list[Row]:
    """``all``, or comma-separated 1-based row numbers of :data:`ROWS`."""
    if spec == "all":
        return list(ROWS)
    try:
        picked = [int(i) for i in spec.split(",")]
    except ValueError:
        picked = []
    if not picked or any(not 1 <= i <= len(ROWS) for i in picked):
        raise ValueError(f"{spec!r}: expected 'all' or row numbers 1..{len(ROWS)} separated by commas")
    return [ROWS[i - 1] for i in picked]


def shifted(samples: list[Sample], seed: int = 0) -> list[Sample]:
    """``samples`` through :func:`~cp_train.shift.domain_shift`, each seeded by its name."""
    out = []
    for s in samples:
        image, mask = domain_shift(s.image, s.mask, np.random.default_rng(shift_seed(s.name, seed)))
        out.append(Sample(f"{s.name}{SHIFT_SUFFIX}{seed}", image, mask))
    return out


def accuracy_table(bundle: Bundle, data: str | Path, split: str | Path, cache_dir: str | Path,
                   rows: list[Row], on_row: Callable[[dict], None] | None = None, shift: bool = False) -> list[dict]:
    """Score ``rows`` on the ``split`` of ``data`` (pushed through the domain shift with ``shift``);
    ``on_row(row_dict)`` is called as each finishes."""
    models = build_models(bundle)
    samples = load_samples(data, read_split(split), progress=False)
    if shift:
        samples = shifted(samples)
    with torch.no_grad():
        emb = EmbeddingCache(cache_dir, bundle, models.image_encoder).fill(samples, progress=False)
    out = []
    for row in rows:
        t0 = time.perf_counter()
        r = evaluate(bundle, models, samples, emb, PipelineOptions(**row.options), gt_boxes=row.boxes == "GT boxes",
                     per_image=True)
        out.append({"prompts": row.prompts, "boxes": row.boxes, **r, "seconds": round(time.perf_counter() - t0, 1)})
        if on_row is not None:
            on_row(out[-1])
    return out


# A per-image change smaller than this is counted as neither better nor worse.
CHANGE_MIN = 0.01


def fine_vs_coarse(row: dict) -> str:
    """The refine pass against its own coarse pass on the same boxes: the mean Dice gain, and on
    how many images it is better or worse by at least :data:`CHANGE_MIN` ('' for one-pass rows)."""
    pairs = [(p["dice"], p["coarse_dice"]) for p in row.get("per_image", []) if "coarse_dice" in p]
    if not pairs:
        return ""
    gain = [f - c for f, c in pairs]
    better, worse = sum(g >= CHANGE_MIN for g in gain), sum(g <= -CHANGE_MIN for g in gain)
    return f"{sum(gain) / len(gain):+.4f} (better {better}, worse {worse})"


def table_header() -> str:
    return ("| prompts | boxes | mDice | mIoU | fine - coarse | s |\n"
            "| --- | --- | --- | --- | --- | --- |")


def table_line(row: dict) -> str:
    return (f"| {row['prompts']} | {row['boxes']} | {row['mDice']:.4f} | {row['mIoU']:.4f} | "
            f"{fine_vs_coarse(row)} | {row['seconds']} |")
