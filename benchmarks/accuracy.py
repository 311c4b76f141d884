"""Accuracy table: mDice / mIoU of a bundle on a split, for every prompt mode of the paper.

    python benchmarks/accuracy.py --bundle B --data DIR --split DIR/splits/test.txt [--json out.json]

Embeddings come from the training cache (computed once per image with the bundle's encoder), so
all rows share one encoder pass per image. Rows: each ``--prompts`` mode with detector boxes,
``curriculum`` with positive edge labels, and ``box``/``curriculum`` with ground-truth boxes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cp_deploy.bundle import load_bundle
from cp_deploy.models.build import build_models
from cp_deploy.pipeline import PipelineOptions
from cp_train.data import DEFAULT_CACHE_DIR, EmbeddingCache, load_samples, read_split
from cp_train.evaluate import evaluate

ROWS = [
    ("points", "detector", dict(prompts="points")),
    ("box", "detector", dict(prompts="box")),
    ("box+points", "detector", dict(prompts="box+points")),
    ("box+mask", "detector", dict(prompts="box+mask")),
    ("curriculum", "detector", dict(prompts="curriculum")),
    ("curriculum, positive edge labels", "detector", dict(prompts="curriculum", edge_label="positive")),
    ("box", "GT boxes", dict(prompts="box")),
    ("curriculum", "GT boxes", dict(prompts="curriculum")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    ap.add_argument("--split", required=True, help="names to score")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="embedding cache")
    ap.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or 'all'")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    models = build_models(bundle)
    samples = load_samples(args.data, read_split(args.split), progress=False)
    with torch.no_grad():
        emb = EmbeddingCache(args.cache_dir, bundle, models.image_encoder).fill(samples, progress=False)
    picked = ROWS if args.rows == "all" else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    out = []
    print(f"bundle {bundle.root} ({bundle.detector.arch}), {len(samples)} images of {Path(args.split).name}")
    print("| prompts | boxes | mDice | mIoU | s |\n| --- | --- | --- | --- | --- |")
    for name, boxes, opts in picked:
        t0 = time.perf_counter()
        r = evaluate(bundle, models, samples, emb, PipelineOptions(**opts), gt_boxes=boxes == "GT boxes")
        row = {"prompts": name, "boxes": boxes, **r, "seconds": round(time.perf_counter() - t0, 1)}
        out.append(row)
        print(f"| {name} | {boxes} | {r['mDice']:.4f} | {r['mIoU']:.4f} | {row['seconds']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": str(bundle.root), "detector": bundle.detector.arch,
                                               "split": args.split, "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
