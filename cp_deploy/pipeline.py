"""The curriculum pipeline: detector boxes -> coarse box pass -> edge points -> fine pass.

It knows the Engine protocol and the bundle's settings, never a runtime by name. Prompt modes
(the paper's ablations; ``docs/METHOD.md`` explains each choice the paper leaves open):

============  ========================================================================
``box``        box head on the box.
``points``     refine head on the 8 edge points, labelled positive (a prompt of only
               negative points has no foreground to segment).
``box+points`` refine head on the box plus the 8 points with the edge label.
``box+mask``   box head on the box, then refine head on the box plus the coarse logits.
``curriculum`` box head on the box, then refine head on the 8 points with the edge label
               plus the coarse logits (and SAM's padding point, as there is no box).
============  ========================================================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import nms

from cp_deploy.bundle import EDGE_LABELS, PROMPT_MODES, Bundle
from cp_deploy.engines.base import Engine
from cp_deploy.models.detector import decode_detections
from cp_deploy.models.keypoints import decode_heatmaps, expand_boxes
from cp_deploy.preprocess import Frame, PreprocessConfig, postprocess_masks, preprocess_image, to_rgb_uint8

STAGES = ("preprocess", "encode", "detect", "box", "keypoints", "refine", "postprocess")


@dataclass
class PipelineOptions:
    """Run-time choices; ``None`` means the bundle's own setting."""

    prompts: str = "curriculum"
    edge_label: str | None = None
    mode: str | None = None
    score_threshold: float | None = None
    nms_iou: float | None = None
    max_instances: int | None = None
    min_instances: int | None = None

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_MODES:
            raise ValueError(f"prompts must be one of {', '.join(PROMPT_MODES)}, got {self.prompts!r}")
        if self.edge_label is not None and self.edge_label not in EDGE_LABELS:
            raise ValueError("edge_label must be 'negative' or 'positive'")
        if self.mode is not None and self.mode not in ("all", "top1"):
            raise ValueError("mode must be 'all' or 'top1'")


@dataclass
class ImageResult:
    """One image's prediction, in original-image pixels."""

    original_size: tuple[int, int]
    boxes: np.ndarray  # Kx4 xyxy
    scores: np.ndarray  # K
    points: np.ndarray  # Kx8x2 (K x 0 x 2 when the mode uses no points)
    point_scores: np.ndarray  # Kx8
    iou_predictions: np.ndarray  # K, of the final pass
    masks: np.ndarray  # KxHxW bool, final pass
    mask: np.ndarray  # HxW bool, union of ``masks``
    coarse_mask: np.ndarray  # HxW bool, union of the coarse (box) pass
    low_res_logits: np.ndarray  # Kx1xhxw float32, final pass
    coarse_logits: np.ndarray  # Kx1xhxw float32, coarse pass
    timings_ms: dict[str, float] = field(default_factory=dict)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class CurriculumPipeline:
    """Segments batches of decoded images with one encoder call per batch."""

    def __init__(self, bundle: Bundle, engine: Engine, options: PipelineOptions | None = None) -> None:
        self.bundle = bundle
        self.engine = engine
        self.options = options or PipelineOptions()
        p, o = bundle.prompt, self.options
        self.mode = o.mode or p.mode
        self.score_threshold = p.score_threshold if o.score_threshold is None else o.score_threshold
        self.nms_iou = p.nms_iou if o.nms_iou is None else o.nms_iou
        self.max_instances = p.max_instances if o.max_instances is None else o.max_instances
        self.min_instances = p.min_instances if o.min_instances is None else o.min_instances
        self.edge_label = EDGE_LABELS[o.edge_label or p.edge_label]
        self.sam_cfg = bundle.preprocess
        self.det_cfg = bundle.detector.preprocess or self.sam_cfg
        self.kp_cfg = bundle.keypoints.preprocess or self.sam_cfg

    # -- helpers --------------------------------------------------------------------------------
    def _inputs(
        self, images: list[np.ndarray], cfg: PreprocessConfig, cache: dict
    ) -> tuple[torch.Tensor, list[Frame]]:
        """Preprocess once per distinct config (stages with equal settings share the tensor).

        For a CUDA engine the batch is staged in pinned memory and copied asynchronously, so the
        copy overlaps work already queued on the GPU."""
        if cfg not in cache:
            xs, frames = zip(*(preprocess_image(im, cfg) for im in images))
            x = torch.stack(xs)
            if self.engine.device.type == "cuda":
                x = x.pin_memory().to(self.engine.device, non_blocking=True)
            else:
                x = x.to(self.engine.device)
            cache[cfg] = (x, list(frames))
        return cache[cfg]

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NMS, then the score threshold (but at least ``min_instances`` of the best), then
        top-1 or at most K instances."""
        if len(boxes):
            keep = nms(boxes.float(), scores.float(), self.nms_iou)
            boxes, scores = boxes[keep], scores[keep]
        passed = int((scores >= self.score_threshold).sum())
        k = min(max(passed, self.min_instances), 1 if self.mode == "top1" else self.max_instances)
        return boxes[:k], scores[:k]

    # -- stages ---------------------------------------------------------------------------------
    def detect(
        self, images: list[np.ndarray], emb: torch.Tensor, frames: list[Frame], cache: dict | None = None,
        raw: dict[str, torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (Kx4 boxes in original pixels, K scores) after threshold, NMS and top-K.

        ``images`` are RGB uint8; ``emb`` and ``frames`` are the SAM embeddings and geometry;
        ``raw`` are the detector's outputs when they were queued already (see :meth:`predict`).
        """
        cache = {} if cache is None else cache
        if self.bundle.detector.reads == "image":
            det_x, det_frames = self._inputs(images, self.det_cfg, cache)
        else:
            det_x, det_frames = emb, frames
        if raw is None:
            raw = self.engine.detect(det_x)
        self.engine.join()
        out = []
        spec = self.bundle.detector
        for (b, s), fr in zip(decode_detections(spec.arch, raw, spec.config), det_frames):
            b = torch.from_numpy(fr.boxes_to_original(b.cpu().numpy())).float()
            out.append(self._select(b, s.cpu().float()))
        return out

    # -- the pipeline -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        images: list[np.ndarray],
        boxes: list[np.ndarray] | None = None,
        points: list[np.ndarray] | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> list[ImageResult]:
        """Segment decoded images (any of HxW, HxWx3, HxWx4; uint8, uint16 or float).

        Overrides, for evaluation and training: ``boxes`` (per image, Kx4 xyxy in original
        pixels) replaces the detector, e.g. ground-truth boxes; ``points`` (per image, Kx8x2, with
        ``boxes``) replaces the keypoint net; ``embeddings`` (BxCxhxw) replaces the encoder, e.g.
        from the training cache.
        """
        if not images:
            return []
        t = {s: 0.0 for s in STAGES}
        dev = self.engine.device
        t0 = time.perf_counter()
        images = [to_rgb_uint8(im) for im in images]
        cache: dict = {}
        x, frames = self._inputs(images, self.sam_cfg, cache)
        t["preprocess"] += _ms(t0)

        raw = None
        if boxes is None and self.bundle.detector.reads == "image":
            # Queued before the encoder: both read only the image, so on a GPU they overlap.
            t0 = time.perf_counter()
            raw = self.engine.detect(self._inputs(images, self.det_cfg, cache)[0])
            t["detect"] += _ms(t0)

        t0 = time.perf_counter()
        emb = self.engine.encode(x) if embeddings is None else embeddings.to(dev, torch.float32)
        t["encode"] += _ms(t0)

        t0 = time.perf_counter()
        if boxes is None:
            per_image = self.detect(images, emb, frames, cache, raw=raw)
        else:
            given = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) for b in boxes]
            per_image = [(b, torch.ones(len(b))) for b in given]
        counts = [len(b) for b, _ in per_image]
        idx = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.long, device=dev)
        boxes_orig = torch.cat([b for b, _ in per_image]) if sum(counts) else torch.zeros(0, 4)
        scores = torch.cat([s for _, s in per_image]) if sum(counts) else torch.zeros(0)
        t["detect"] += _ms(t0)

        n = len(idx)
        k_pts = 8 if self.options.prompts in ("curriculum", "points", "box+points") else 0
        coarse = final = None
        points_orig = torch.zeros(n, k_pts, 2)
        point_scores = torch.zeros(n, k_pts)
        iou = torch.zeros(n, 1)
        if n:
            inst_emb = emb[idx]
            sam_boxes = self._to_frame(boxes_orig, idx, frames, self.sam_cfg, boxes=True).to(dev)
            prompts = self.options.prompts
            if prompts in ("box", "box+mask", "curriculum"):
                t0 = time.perf_counter()
                coarse, iou = self.engine.decode("box", inst_emb, boxes=sam_boxes)
                t["box"] += _ms(t0)
            point_prompt = None
            if k_pts:
                t0 = time.perf_counter()
                if points is None:
                    points_orig, point_scores = self.keypoints(images, boxes_orig, idx, emb, frames, cache)
                else:
                    given_pts = [torch.as_tensor(p, dtype=torch.float32).reshape(-1, 8, 2) for p in points]
                    points_orig = torch.cat(given_pts)
                    point_scores = torch.ones(points_orig.shape[:2])
                label = 1 if prompts == "points" else self.edge_label
                pts = self._to_frame(points_orig, idx, frames, self.sam_cfg).to(dev)
                point_prompt = (pts, torch.full(pts.shape[:2], label, dtype=torch.int64, device=dev))
                t["keypoints"] += _ms(t0)
            if prompts == "box":
                final = coarse
            else:
                t0 = time.perf_counter()
                final, iou = self.engine.decode(
                    "refine",
                    inst_emb,
                    points=point_prompt,
                    boxes=sam_boxes if prompts in ("box+points", "box+mask") else None,
                    mask_input=coarse,
                )
                t["refine"] += _ms(t0)

        t0 = time.perf_counter()
        results = []
        start = 0
        for i, fr in enumerate(frames):
            sl = slice(start, start + counts[i])
            start += counts[i]
            h, w = fr.original_size
            if counts[i]:
                fin = final[sl].float()
                masks = (postprocess_masks(fin, fr) > 0).cpu().numpy()
                low = fin.cpu().numpy()
                if coarse is None:
                    coarse_mask, co_np = np.zeros((h, w), bool), np.zeros_like(low)
                else:
                    co = coarse[sl].float()
                    coarse_mask = (postprocess_masks(co, fr) > 0).any(0).cpu().numpy()
                    co_np = co.cpu().numpy()
            else:
                masks = np.zeros((0, h, w), bool)
                coarse_mask = np.zeros((h, w), bool)
                low = co_np = np.zeros((0, 1, 1, 1), np.float32)
            results.append(
                ImageResult(
                    original_size=(h, w),
                    boxes=boxes_orig[sl].cpu().numpy(),
                    scores=scores[sl].cpu().numpy(),
                    points=points_orig[sl].cpu().numpy(),
                    point_scores=point_scores[sl].cpu().numpy(),
                    iou_predictions=iou[sl, 0].float().cpu().numpy(),
                    masks=masks,
                    mask=masks.any(0) if len(masks) else np.zeros((h, w), bool),
                    coarse_mask=coarse_mask,
                    low_res_logits=low,
                    coarse_logits=co_np,
                )
            )
        t["postprocess"] += _ms(t0)
        per_image_t = {k: round(v / len(images), 3) for k, v in t.items()}
        for r in results:
            r.timings_ms = dict(per_image_t)
        return results

    def _to_frame(
        self, xy: torch.Tensor, idx: torch.Tensor, frames: list[Frame], cfg: PreprocessConfig, boxes: bool = False
    ) -> torch.Tensor:
        """Original pixels -> the input frame of ``cfg`` for each instance's image."""
        out = []
        for j, i in enumerate(idx.tolist()):
            fr = frames[i]
            if fr.image_size != cfg.image_size:
                fr = Frame.for_image(fr.original_size, cfg.image_size)
            a = xy[j].cpu().numpy()
            out.append(fr.boxes_to_input(a)[0] if boxes else fr.coords_to_input(a))
        return torch.as_tensor(np.stack(out), dtype=torch.float32) if out else torch.zeros((0, *xy.shape[1:]))

    def keypoints(
        self,
        images: list[np.ndarray],
        boxes_orig: torch.Tensor,
        idx: torch.Tensor,
        emb: torch.Tensor,
        frames: list[Frame],
        cache: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-down edge points (Nx8x2 original pixels, Nx8 confidences) for N instances, where
        ``idx`` gives each instance's image."""
        cache = {} if cache is None else cache
        spec = self.bundle.keypoints
        if spec.reads == "image":
            feats, kp_frames = self._inputs(images, self.kp_cfg, cache)
        else:
            feats, kp_frames = emb, frames
        kp_boxes = self._to_frame(boxes_orig, idx, kp_frames, self.kp_cfg, boxes=True)
        margin = float(spec.config.get("margin", 0.15))
        crops = expand_boxes(kp_boxes, margin)
        rois = torch.cat([idx.float().cpu()[:, None], crops], dim=1)
        heat = self.engine.keypoints(feats, rois.to(self.engine.device))
        pts, conf = decode_heatmaps(heat.cpu(), crops)
        orig = []
        for j, i in enumerate(idx.tolist()):
            orig.append(kp_frames[i].coords_to_original(pts[j].numpy()))
        return torch.as_tensor(np.stack(orig), dtype=torch.float32), conf
