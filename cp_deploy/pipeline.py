"""The curriculum pipeline: detector boxes -> coarse box pass -> edge points -> fine pass.

It knows the Engine protocol and the bundle's settings, never a runtime by name. Prompt modes
(the paper's ablations; ``docs/METHOD.md`` explains each choice the paper leaves open) are rows
of :data:`PROMPT_TABLE`:

============  ========================================================================
``box``        box head on the box.
``points``     refine head on the 8 edge points, labelled positive (a prompt of only
               negative points has no foreground to segment).
``box+points`` refine head on the box plus the 8 points with the edge label.
``box+mask``   box head on the box, then refine head on the box plus the coarse logits.
``curriculum`` box head on the box, then refine head on the 8 points with the edge label
               plus the coarse logits (and SAM's padding point, as there is no box).
============  ========================================================================

Boxes and points are handed around in input-image pixels; :class:`Resize` maps a whole batch
of them to and from a model's resized input in one tensor operation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import nms

from cp_deploy.bundle import EDGE_LABELS, Bundle, load_bundle
from cp_deploy.constants import PROMPT_MODES
from cp_deploy.engines import create_engine
from cp_deploy.engines.base import Engine
from cp_deploy.files import write_mask
from cp_deploy.models.build import stage_families
from cp_deploy.models.keypoints import decode_heatmaps, expand_boxes
from cp_deploy.models.registry import decode_detections
from cp_deploy.preprocess import Geometry, PreprocessConfig, postprocess_batch, preprocess_batch, to_rgb_uint8
from cp_deploy.visualize import draw_overlay

STAGES = ("preprocess", "encode", "detect", "box", "keypoints", "refine", "postprocess")
EDGE_POINTS = 8  # the keypoint net's points per instance
REFINE_PROMPTS = ("points", "box", "mask")


@dataclass(frozen=True)
class PromptMode:
    """Which passes a prompt mode runs and what each is prompted with.

    ``coarse``: the box head on the box. ``refine``: the refine head's prompts, any of
    ``points`` (the edge points), ``box`` and ``mask`` (the coarse logits); empty when the coarse
    pass is final. ``positive_points``: label the points positive instead of the edge label."""

    coarse: bool
    refine: tuple[str, ...] = ()
    positive_points: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.refine) - set(REFINE_PROMPTS)
        if unknown:
            raise ValueError(f"unknown refine prompt(s) {sorted(unknown)}; expected {REFINE_PROMPTS}")
        if not self.coarse and not self.refine:
            raise ValueError("a prompt mode runs the coarse pass, the refine pass or both")
        if "mask" in self.refine and not self.coarse:
            raise ValueError("the refine pass can take the coarse logits only after a coarse pass")

    @property
    def points(self) -> bool:
        """Whether the mode needs edge points (and so runs the keypoint stage)."""
        return "points" in self.refine


PROMPT_TABLE: dict[str, PromptMode] = {
    "box": PromptMode(coarse=True),
    "points": PromptMode(coarse=False, refine=("points",), positive_points=True),
    "box+points": PromptMode(coarse=False, refine=("box", "points")),
    "box+mask": PromptMode(coarse=True, refine=("box", "mask")),
    "curriculum": PromptMode(coarse=True, refine=("points", "mask")),
}


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

    def save(self, path: str | Path) -> Path:
        """The union mask as a 0/255 PNG at the image's size, written atomically as ``batch`` writes it."""
        write_mask(path, self.mask)
        return Path(path)

    def overlay(self, image: np.ndarray) -> np.ndarray:
        """The overlay ``batch --overlays`` writes, as an RGB uint8 array: ``image`` (as read, any
        form ``predict`` takes) with the final and coarse contours, boxes with scores and edge points."""
        rgb = to_rgb_uint8(image)
        if rgb.shape[:2] != tuple(self.original_size):
            raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, the result's "
                             f"{self.original_size[1]}x{self.original_size[0]}: pass the image it was predicted on")
        return draw_overlay(rgb, self)


class StageTimer:
    """Accumulated wall time of one stage over its ``with`` blocks (ultralytics' ``Profile``).

    On CUDA the device is synchronised before each clock read: kernels run asynchronously, so an
    unsynchronised stage would be charged for its launches and the next one for its kernels."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = 0.0
        self._start = 0.0

    def __enter__(self) -> StageTimer:
        self._start = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms += (self._clock() - self._start) * 1000.0

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def stage_timers(device: torch.device) -> dict[str, StageTimer]:
    """One :class:`StageTimer` per pipeline stage."""
    return {s: StageTimer(device) for s in STAGES}


@dataclass(frozen=True)
class Resize:
    """Resize-longest-side geometry of a batch, per instance: pixel (x, y) scale factors and the
    original (width, height), both float64 so the mapping rounds as ResizeLongestSide's does."""

    scale: torch.Tensor  # Nx2 (sx, sy)
    size: torch.Tensor  # Nx2 (w, h)

    @classmethod
    def of(cls, geometry: list[Geometry], device: torch.device | None = None) -> Resize:
        """One row per image of ``geometry``."""
        rows = [(g.input_size[1] / g.original_size[1], g.input_size[0] / g.original_size[0],
                 g.original_size[1], g.original_size[0]) for g in geometry]
        t = torch.tensor(rows, dtype=torch.float64, device=device).reshape(-1, 4)
        return cls(t[:, :2], t[:, 2:])

    def __getitem__(self, index: torch.Tensor) -> Resize:
        """The rows of ``index`` (e.g. each instance's image)."""
        return Resize(self.scale[index], self.size[index])

    def points_to_model(self, xy: torch.Tensor) -> torch.Tensor:
        """NxPx2 input-image pixels -> model-input pixels (float32)."""
        return (xy.double() * self.scale[:, None, :]).float()

    def points_to_image(self, xy: torch.Tensor) -> torch.Tensor:
        """NxPx2 model-input pixels -> input-image pixels (float32)."""
        return (xy.double() / self.scale[:, None, :]).float()

    def boxes_to_model(self, boxes: torch.Tensor) -> torch.Tensor:
        """Nx4 xyxy input-image pixels -> model-input pixels (float32)."""
        return self.points_to_model(boxes.reshape(-1, 2, 2)).reshape(-1, 4)

    def boxes_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Nx4 xyxy model-input pixels -> input-image pixels, clipped to the image (float32)."""
        xy = boxes.double().reshape(-1, 2, 2) / self.scale[:, None, :]
        xy = torch.minimum(xy.clamp(min=0), self.size[:, None, :])
        return xy.reshape(-1, 4).float()


class Batch:
    """Decoded images as RGB uint8, preprocessed at most once per model config (stages with equal
    settings share the tensor)."""

    def __init__(self, images: list[np.ndarray], device: torch.device) -> None:
        self.images = [to_rgb_uint8(im) for im in images]
        self.device = device
        self._inputs: dict[PreprocessConfig, torch.Tensor] = {}
        self._resizes: dict[PreprocessConfig, Resize] = {}

    def __len__(self) -> int:
        return len(self.images)

    def geometry(self, cfg: PreprocessConfig) -> list[Geometry]:
        """Each image's resize geometry for ``cfg``."""
        return [Geometry.for_image(im.shape[:2], cfg.image_size) for im in self.images]

    def resize(self, cfg: PreprocessConfig) -> Resize:
        """:meth:`geometry` as a :class:`Resize` on the device, built once per config."""
        if cfg not in self._resizes:
            self._resizes[cfg] = Resize.of(self.geometry(cfg), self.device)
        return self._resizes[cfg]

    def inputs(self, cfg: PreprocessConfig) -> torch.Tensor:
        """Bx3xSxS model input for ``cfg`` on the device: on CUDA the uint8 pixels are uploaded
        and resized there, bit-equal to the CPU path (:func:`preprocess_batch`)."""
        if cfg not in self._inputs:
            self._inputs[cfg] = preprocess_batch(self.images, cfg, self.device)
        return self._inputs[cfg]


@dataclass
class Instances:
    """A batch's instances, flattened: Nx4 boxes (input pixels) and N scores, ``image`` the index
    of each one's image and ``counts`` the number per image."""

    boxes: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor
    counts: list[int]

    @classmethod
    def gather(cls, per_image: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Instances:
        """Flatten per-image (boxes, scores)."""
        counts = [len(b) for b, _ in per_image]
        image = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                        torch.tensor(counts, dtype=torch.long, device=device))
        if not sum(counts):
            return cls(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), image, counts)
        boxes = torch.cat([b.to(device) for b, _ in per_image])
        scores = torch.cat([s.to(device) for _, s in per_image])
        return cls(boxes, scores, image, counts)

    def __len__(self) -> int:
        return len(self.image)


@dataclass
class Passes:
    """The decoder passes' outputs: coarse and final Nx1xhxw logits (``None`` where a pass did
    not run or there are no instances), the final pass's Nx1 IoU, and the edge points (Nx8x2
    input pixels) with their Nx8 scores; ``embeddings`` and ``sam_boxes`` are each instance's
    image embedding and box in SAM's frame, gathered once for both passes."""

    points: torch.Tensor
    point_scores: torch.Tensor
    iou: torch.Tensor
    embeddings: torch.Tensor
    sam_boxes: torch.Tensor
    coarse: torch.Tensor | None = None
    final: torch.Tensor | None = None


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


class CurriculumPipeline:
    """Segments batches of decoded images with one encoder call per batch."""

    def __init__(self, bundle: Bundle, engine: Engine, options: PipelineOptions | None = None) -> None:
        self.bundle = bundle
        self.engine = engine
        self.options = options or PipelineOptions()
        p, o = bundle.prompt, self.options
        self.prompt_mode = PROMPT_TABLE[o.prompts]
        self.mode = o.mode or p.mode
        self.score_threshold = p.score_threshold if o.score_threshold is None else o.score_threshold
        self.nms_iou = p.nms_iou if o.nms_iou is None else o.nms_iou
        self.max_instances = p.max_instances if o.max_instances is None else o.max_instances
        self.min_instances = p.min_instances if o.min_instances is None else o.min_instances
        self.edge_label = EDGE_LABELS[o.edge_label or p.edge_label]
        self.sam_cfg = bundle.preprocess
        self.det_cfg = bundle.detector.preprocess or self.sam_cfg
        self.kp_cfg = bundle.keypoints.preprocess or self.sam_cfg

    @classmethod
    def from_bundle(
        cls, bundle: str | Path | Bundle | None = None, engine: str = "torch", device: str = "cpu", *,
        graphs: str | Path | None = None, threads: int = 0, precision: str = "fp32", compile: bool = False,
        **options: object,
    ) -> CurriculumPipeline:
        """The pipeline of ``bundle`` (a folder, a loaded Bundle, or ``None``: the default) on the
        engine called ``engine``; ``options`` are :class:`PipelineOptions` fields, and the other
        keywords go to :func:`~cp_deploy.engines.create_engine`."""
        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        stage_families(bundle)  # an unknown arch is a one-line BundleError whatever the engine
        eng = create_engine(engine, bundle, device=device, graphs=graphs, threads=threads, precision=precision,
                            compile=compile)
        return cls(bundle, eng, PipelineOptions(**options))

    @property
    def device(self) -> torch.device:
        return self.engine.device

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
        dt = stage_timers(self.device)
        with dt["preprocess"]:
            batch = self._preprocess(images, boxes is None, points is None, embeddings is None)
        with dt["encode"]:
            emb = self._encode(batch, embeddings)
        with dt["detect"]:
            inst = self._detect(batch, emb) if boxes is None else self._given_boxes(boxes)
        with dt["box"]:
            passes = self._coarse_pass(batch, emb, inst)
        with dt["keypoints"]:
            self._edge_points(batch, emb, inst, passes, points)
        with dt["refine"]:
            self._refine_pass(batch, inst, passes)
        with dt["postprocess"]:
            results = self._postprocess(batch, inst, passes)
        per_image = {s: round(t.ms / len(images), 3) for s, t in dt.items()}
        for r in results:
            r.timings_ms = dict(per_image)
        return results

    # -- public stages, for evaluation, training and benchmarks --------------------------------------
    @torch.no_grad()
    def detect(self, images: list[np.ndarray], *, embeddings: torch.Tensor | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (Kx4 boxes in input pixels, K scores; on the CPU) after threshold, NMS and
        top-K. ``embeddings`` (BxCxhxw, for a detector that reads them): default the encoder's."""
        batch = Batch(images, self.device)
        if embeddings is None and self._detector_reads_embedding:
            embeddings = self._encode(batch, None)
        inst = self._detect(batch, embeddings)
        return list(zip(inst.boxes.cpu().split(inst.counts), inst.scores.cpu().split(inst.counts)))

    @torch.no_grad()
    def keypoints(
        self, images: list[np.ndarray], boxes: torch.Tensor, *, image_index: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge points (Nx8x2 input pixels, Nx8 confidences; on the CPU) of N boxes (Nx4 input
        pixels). ``image_index`` (N) gives each box's image (default: all in the first);
        ``embeddings`` (BxCxhxw, for a keypoint net that reads them): default the encoder's."""
        batch = Batch(images, self.device)
        boxes = boxes.to(self.device, torch.float32).reshape(-1, 4)
        if image_index is None:
            image_index = torch.zeros(len(boxes), dtype=torch.long)
        if embeddings is None and self.bundle.keypoints.reads != "image":
            embeddings = self._encode(batch, None)
        points, scores = self._keypoints(batch, embeddings, boxes, image_index.to(self.device))
        return points.cpu(), scores.cpu()

    # -- stages -------------------------------------------------------------------------------------
    @property
    def _detector_reads_embedding(self) -> bool:
        return self.bundle.detector.reads != "image"

    def _preprocess(self, images: list[np.ndarray], detect: bool, keypoints: bool, encode: bool) -> Batch:
        """The batch with every model input this run reads."""
        batch = Batch(images, self.device)
        if encode:
            batch.inputs(self.sam_cfg)
        if detect and not self._detector_reads_embedding:
            batch.inputs(self.det_cfg)
        if keypoints and self.prompt_mode.points and self.bundle.keypoints.reads == "image":
            batch.inputs(self.kp_cfg)
        return batch

    def _encode(self, batch: Batch, embeddings: torch.Tensor | None) -> torch.Tensor:
        if embeddings is not None:
            return embeddings.to(self.device, torch.float32)
        return self.engine.encode(batch.inputs(self.sam_cfg))

    def _detect(self, batch: Batch, emb: torch.Tensor | None) -> Instances:
        """The detector, its decode back to input pixels, then :meth:`_select` per image."""
        if self._detector_reads_embedding:
            x, cfg = emb, self.sam_cfg
        else:
            x, cfg = batch.inputs(self.det_cfg), self.det_cfg
        raw = self.engine.detect(x)
        self.engine.join()
        spec = self.bundle.detector
        found = Instances.gather(decode_detections(spec.arch, raw, spec.config), self.device)
        boxes = batch.resize(cfg)[found.image].boxes_to_image(found.boxes)
        per_image = zip(boxes.split(found.counts), found.scores.float().split(found.counts))
        return Instances.gather([self._select(b, s) for b, s in per_image], self.device)

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NMS, then the score threshold (but at least ``min_instances`` of the best), then
        top-1 or at most K instances."""
        if len(boxes):
            keep = nms(boxes.float(), scores.float(), self.nms_iou)
            boxes, scores = boxes[keep], scores[keep]
        passed = int((scores >= self.score_threshold).sum())
        k = min(max(passed, self.min_instances), 1 if self.mode == "top1" else self.max_instances)
        return boxes[:k], scores[:k]

    def _given_boxes(self, boxes: list[np.ndarray]) -> Instances:
        given = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) for b in boxes]
        return Instances.gather([(b, torch.ones(len(b))) for b in given], self.device)

    def _coarse_pass(self, batch: Batch, emb: torch.Tensor, inst: Instances) -> Passes:
        """The box head on each box, when the mode runs it; sets up the passes' outputs."""
        k = EDGE_POINTS if self.prompt_mode.points else 0
        n = len(inst)
        passes = Passes(torch.zeros(n, k, 2, device=self.device), torch.zeros(n, k, device=self.device),
                        torch.zeros(n, 1, device=self.device), emb[inst.image],
                        batch.resize(self.sam_cfg)[inst.image].boxes_to_model(inst.boxes))
        if n and self.prompt_mode.coarse:
            passes.coarse, passes.iou = self.engine.decode("box", passes.embeddings, boxes=passes.sam_boxes)
            passes.final = passes.coarse
        return passes

    def _edge_points(self, batch: Batch, emb: torch.Tensor, inst: Instances, passes: Passes,
                     given: list[np.ndarray] | None) -> None:
        """The keypoint net's points on each box (or the ``given`` ones), when the mode uses them."""
        if not (len(inst) and self.prompt_mode.points):
            return
        if given is None:
            passes.points, passes.point_scores = self._keypoints(batch, emb, inst.boxes, inst.image)
        else:
            pts = torch.cat([torch.as_tensor(p, dtype=torch.float32).reshape(-1, EDGE_POINTS, 2) for p in given])
            passes.points, passes.point_scores = pts.to(self.device), torch.ones(pts.shape[:2], device=self.device)

    def _keypoints(self, batch: Batch, emb: torch.Tensor | None, boxes: torch.Tensor, image: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-down edge points on RoI crops of the keypoint net's features, in input pixels."""
        spec = self.bundle.keypoints
        if spec.reads == "image":
            feats, feats_cfg = batch.inputs(self.kp_cfg), self.kp_cfg
        else:
            feats, feats_cfg = emb, self.sam_cfg
        margin = float(spec.config.get("margin", 0.15))
        crops = expand_boxes(batch.resize(self.kp_cfg)[image].boxes_to_model(boxes), margin)
        rois = torch.cat([image.to(crops.device, torch.float32)[:, None], crops], dim=1)
        heat = self.engine.keypoints(feats, rois.to(self.device))
        pts, conf = decode_heatmaps(heat, crops.to(heat.device))
        return batch.resize(feats_cfg)[image].points_to_image(pts.to(self.device)), conf.to(self.device)

    def _refine_pass(self, batch: Batch, inst: Instances, passes: Passes) -> None:
        """The refine head on the mode's prompts, when the mode runs it."""
        prompts = self.prompt_mode.refine
        if not (len(inst) and prompts):
            return
        point_prompt = None
        if "points" in prompts:
            pts = batch.resize(self.sam_cfg)[inst.image].points_to_model(passes.points)
            label = 1 if self.prompt_mode.positive_points else self.edge_label
            point_prompt = (pts, torch.full(pts.shape[:2], label, dtype=torch.int64, device=self.device))
        passes.final, passes.iou = self.engine.decode(
            "refine", passes.embeddings, points=point_prompt,
            boxes=passes.sam_boxes if "box" in prompts else None,
            mask_input=passes.coarse if "mask" in prompts else None,
        )

    def _postprocess(self, batch: Batch, inst: Instances, passes: Passes) -> list[ImageResult]:
        """Masks at each image's size, and every per-instance output as numpy."""
        fields = {"boxes": inst.boxes, "scores": inst.scores, "points": passes.points,
                  "point_scores": passes.point_scores, "iou_predictions": passes.iou[:, 0]}
        per_image = {k: np.split(_numpy(v), np.cumsum(inst.counts)[:-1]) for k, v in fields.items()}
        geos = batch.geometry(self.sam_cfg)
        final, coarse = _per_image(passes.final, inst.counts, geos), _per_image(passes.coarse, inst.counts, geos)
        return [
            ImageResult(**_masks(geo, *fin, *co), **{k: v[i] for k, v in per_image.items()})
            for i, (geo, fin, co) in enumerate(zip(geos, final, coarse))
        ]


def _per_image(logits: torch.Tensor | None, counts: list[int], geos: list[Geometry]) -> list[tuple]:
    """Per image (low-res logits and KxHxW bool masks, both on the CPU) of one pass, or (None,
    None) where it did not run: one upscale for the batch, one copy back of each."""
    if logits is None:
        return [(None, None)] * len(geos)
    masks = postprocess_batch(logits.float(), counts, geos)
    return list(zip(logits.float().cpu().split(counts), masks))


def _masks(geo: Geometry, final: torch.Tensor | None, final_masks: torch.Tensor | None,
           coarse: torch.Tensor | None, coarse_masks: torch.Tensor | None) -> dict:
    """One image's mask fields of :class:`ImageResult` from its final and coarse low-res logits
    and their masks at the image's size (:func:`postprocess_batch`)."""
    h, w = geo.original_size
    if final is None or not len(final):
        empty = np.zeros((0, 1, 1, 1), np.float32)
        return dict(original_size=(h, w), masks=np.zeros((0, h, w), bool), mask=np.zeros((h, w), bool),
                    coarse_mask=np.zeros((h, w), bool), low_res_logits=empty, coarse_logits=empty)
    masks = final_masks.numpy()
    low = _numpy(final)
    if coarse is None:
        coarse_mask, coarse_low = np.zeros((h, w), bool), np.zeros_like(low)
    else:
        coarse_mask = coarse_masks.any(0).numpy()
        coarse_low = _numpy(coarse)
    return dict(original_size=(h, w), masks=masks, mask=masks.any(0), coarse_mask=coarse_mask,
                low_res_logits=low, coarse_logits=coarse_low)
