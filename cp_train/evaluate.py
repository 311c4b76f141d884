"""Score a bundle's networks through the deployment pipeline itself (one Dice, one path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cp_deploy.bundle import Bundle, load_bundle, update_spec
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.files import discover_images, read_image, read_mask
from cp_deploy.metrics import dice, iou
from cp_deploy.models.build import Models, build_models
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_train.data import Sample
from cp_train.targets import mask_instances


def evaluate(
    bundle: Bundle,
    models: Models,
    samples: list[Sample],
    embeddings: torch.Tensor | None = None,
    options: PipelineOptions | None = None,
    gt_boxes: bool = False,
    gt_points: bool = False,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
    per_image: bool = False,
) -> dict:
    """mDice / mIoU of the pipeline on ``samples`` (optionally with GT boxes and edge points); with
    ``per_image`` also each sample's name and Dice, with its coarse pass's Dice where a refine pass
    follows one (the curriculum's gain, image by image)."""
    engine = TorchEngine(bundle, device=str(device), models=models)
    pipe = CurriculumPipeline(bundle, engine, options)
    two_pass = pipe.prompt_mode.coarse and bool(pipe.prompt_mode.refine)
    dices, ious, images = [], [], []
    for i in tqdm(range(0, len(samples), batch_size), desc="validation", unit="batch", leave=False,
                  disable=not progress):
        chunk = samples[i : i + batch_size]
        boxes = points = None
        if gt_boxes:
            insts = [mask_instances(s.mask) for s in chunk]
            boxes = [np.array([x.box for x in ins]).reshape(-1, 4) for ins in insts]
            if gt_points:
                points = [np.array([x.points for x in ins]).reshape(-1, 8, 2) for ins in insts]
        emb = None if embeddings is None else embeddings[i : i + batch_size]
        for s, r in zip(chunk, pipe.predict([s.image for s in chunk], boxes=boxes, points=points, embeddings=emb)):
            dices.append(dice(r.mask, s.mask))
            ious.append(iou(r.mask, s.mask))
            images.append({"name": s.name, "dice": round(dices[-1], 5)})
            if two_pass:
                images[-1]["coarse_dice"] = round(dice(r.coarse_mask, s.mask), 5)
    out = {"mDice": float(np.mean(dices)), "mIoU": float(np.mean(ious))}
    return {**out, "per_image": images} if per_image else out


class DetectorOnly:
    """The engine surface :meth:`CurriculumPipeline.detect` uses, over a detector alone, so a
    detector can be validated with the pipeline's own decode, NMS and threshold but no SAM."""

    def __init__(self, detector: torch.nn.Module, device: torch.device) -> None:
        self.detector, self.device = detector, device

    def detect(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(inputs.to(self.device))

    def join(self) -> None:
        pass


def box_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The union of xyxy boxes (inclusive pixel indices, as instances give them), filled, as an
    HxW boolean mask."""
    m = np.zeros(shape, bool)
    for x0, y0, x1, y1 in np.round(np.asarray(boxes, np.float64).reshape(-1, 4)).astype(int):
        m[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = True
    return m


@torch.inference_mode()
def evaluate_boxes(bundle: Bundle, detector: torch.nn.Module, samples: list[Sample],
                   device: torch.device | str = "cpu", batch_size: int = 16, progress: bool = False) -> dict:
    """Validation of an image-reading detector without SAM: the mean Dice between the union of its
    boxes (after the bundle's threshold, NMS and top-K) and the union of the GT instances' boxes.
    The box pass's Dice tracks it (SAM turns a right box into a right mask), and it needs no SAM
    weights, so a detector can be trained where only the detector and the images are."""
    if bundle.detector.reads != "image":
        raise ValueError("box validation needs a detector that reads the image")
    pipe = CurriculumPipeline(bundle, DetectorOnly(detector, torch.device(device)), PipelineOptions(prompts="box"))
    dices = []
    for i in tqdm(range(0, len(samples), batch_size), desc="validation", unit="batch", leave=False,
                  disable=not progress):
        chunk = samples[i : i + batch_size]
        for s, (boxes, _) in zip(chunk, pipe.detect([s.image for s in chunk])):
            gt = np.array([x.box for x in mask_instances(s.mask)]).reshape(-1, 4)
            dices.append(dice(box_mask(boxes.numpy(), s.mask.shape), box_mask(gt, s.mask.shape)))
    return {"mDice": float(np.mean(dices))}


def score_folder(bundle: Bundle, folder: str | Path, options: PipelineOptions | None = None) -> dict:
    """mDice / mIoU of ``bundle`` on ``folder``/images against ``folder``/masks (matched by stem)."""
    folder = Path(folder)
    masks = {p.with_suffix("").as_posix(): folder / "masks" / p for p in discover_images(folder / "masks")}
    samples = [
        Sample(p.stem, read_image(folder / "images" / p), read_mask(masks[p.with_suffix("").as_posix()]))
        for p in discover_images(folder / "images")
    ]
    return evaluate(bundle, build_models(bundle), samples, options=options, batch_size=1)


def record_examples(bundle_dir: str | Path, folder: str | Path) -> dict:
    """Score the curriculum on ``folder`` and record it in the bundle's metadata (bundle.json)."""
    bundle = load_bundle(bundle_dir)
    scores = score_folder(bundle, folder)
    rounded = {k: round(v, 4) for k, v in scores.items()}
    update_spec(bundle.root, "metadata", {"examples": {"prompts": "curriculum", **rounded}})
    return scores

