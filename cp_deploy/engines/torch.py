"""PyTorch engine: eager (optionally compiled) modules on the CPU or a CUDA device.

``precision`` ``bf16``/``fp16`` runs the image encoder (nearly all the FLOPs) under autocast, which
keeps LayerNorm and softmax in fp32 (SAM's LayerNorm overflows in fp16); the detector, keypoint
net and decoders stay fp32, since their thresholds decide instances and mask borders and they
cost little. Outputs are fp32 either way.

``attention`` picks SAM ViT attention's kernel (:mod:`cp_deploy.models.attention`): ``sam``
(segment-anything's own modules, the CPU default: bit-identical results whatever the batch
composition and thread count, which the executors' outputs are compared on), ``sdpa`` (the CUDA
default) or ``flex``; ``trim_windows`` drops the windowed blocks' padding tokens from ``qkv`` and
``proj``. ``decoder_buckets`` (e.g. :data:`DECODER_BUCKETS`) runs both prompt heads on instance
counts padded up to the next bucket, each (head, bucket, prompt size) captured once as a CUDA graph
on CUDA, so a pass costs one graph launch instead of a few hundred kernel launches.

On CUDA, ``detect`` runs on a side stream, so a caller that queues an image-reading detector before
``encode`` overlaps the two; ``join`` makes the main stream wait for the side stream on the GPU (no
``synchronize``). The pipeline does not: its stage timers synchronise the device, so each stage's
time is its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.models.attention import KERNELS, use_fast_attention
from cp_deploy.models.build import Models, build_models
from cp_deploy.models.sam import PromptHead, labelled_prompts

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Instance counts per decoder call: up to 8 images x 5 instances (the default max_instances) in
# one bucket; larger calls run in chunks of the largest.
DECODER_BUCKETS = (1, 2, 4, 8, 16, 32, 40)


def _pad_rows(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with its first row repeated up to ``b`` rows."""
    return torch.cat([x, x[:1].expand(b - len(x), *x.shape[1:])]) if b > len(x) else x


class BucketedHead:
    """A :class:`PromptHead` called on instance counts padded up to fixed buckets.

    The prompts go through :func:`labelled_prompts` and :meth:`PromptHead.forward_labelled` (the
    branch-free form the exported graphs use; ``forward`` indexes with boolean masks, which a
    CUDA graph cannot capture). Padding rows repeat the first instance, so they hold finite
    values, and are sliced off: each instance's outputs are its own, as unbucketed. With
    ``graphs`` (CUDA only) each (bucket, prompt length) is captured once and replayed."""

    def __init__(self, head: PromptHead, buckets: Sequence[int], graphs: bool = False) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"decoder buckets must be positive instance counts, got {list(buckets)}")
        self.head = head
        self.buckets = tuple(sorted(set(buckets)))
        self.graphs = graphs
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}
        # One memory pool for every graph of this head: safe because replays never overlap and
        # each replay's outputs are cloned before the next one runs.
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    def __call__(
        self,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`PromptHead.forward`'s inputs and outputs (Nx1xhxw logits, Nx1 IoU)."""
        n = len(embeddings)
        feeds = {"embeddings": embeddings,
                 **labelled_prompts(n, self.head.mask_input_size, points, boxes, mask_input, embeddings.device)}
        if n == 0:
            return self.head.forward_labelled(**feeds)
        top = self.buckets[-1]
        outs = [self._bucketed({k: v[i : i + top] for k, v in feeds.items()}) for i in range(0, n, top)]
        return torch.cat([m for m, _ in outs]), torch.cat([q for _, q in outs])

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` instances (``n`` at most the largest bucket)."""
        return next(b for b in self.buckets if b >= n)

    def _bucketed(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(feeds["embeddings"])
        b = self.bucket(n)
        if self.graphs:
            masks, iou = self._replay(feeds, b)
        else:
            masks, iou = self.head.forward_labelled(**{k: _pad_rows(v, b) for k, v in feeds.items()})
        return masks[:n], iou[:n]

    def _replay(self, feeds: dict[str, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (b, feeds["point_coords"].shape[1])
        if key not in self._captured:
            self._captured[key] = self._capture({k: _pad_rows(v, b) for k, v in feeds.items()})
        graph, static, out = self._captured[key]
        n = len(feeds["embeddings"])
        for k, v in feeds.items():  # the padding rows as _pad_rows makes them, without a copy of v
            static[k][:n].copy_(v)
            static[k][n:].copy_(v[:1].expand(b - n, *v.shape[1:]))
        graph.replay()
        return out[0].clone(), out[1].clone()

    def _capture(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, dict, tuple]:
        static = {k: v.clone() for k, v in feeds.items()}
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graphs asks
            for _ in range(2):
                self.head.forward_labelled(**static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: decode and writer threads may touch CUDA while this thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.head.forward_labelled(**static)
        return graph, static, out


class TorchEngine:
    """The bundle's networks as torch modules on one device (see the module docstring)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        models: Models | None = None,
        precision: str = "fp32",
        attention: str | None = None,
        compile: bool = False,
        trim_windows: bool = False,
        decoder_buckets: Sequence[int] | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.attention = attention or ("sdpa" if cuda else "sam")
        if self.attention not in KERNELS:
            raise ValueError(f"attention must be one of {', '.join(KERNELS)}, got {attention!r}")
        self.precision = precision
        self.models = models or build_models(bundle)
        for name in ("image_encoder", "box", "refine", "detector", "keypoints"):
            getattr(self.models, name).to(self.device).eval()
        if self.attention != "sam" or trim_windows:
            use_fast_attention(self.models.image_encoder, self.attention, trim_windows)
        self._encoder = self.models.image_encoder
        if compile:
            # Fixed input sizes per bundle: one graph per batch size, CUDA graphs where shapes repeat.
            self._encoder = torch.compile(self._encoder, mode="max-autotune-no-cudagraphs" if
                                          self.device.type == "cpu" else "reduce-overhead", dynamic=False)
        self._heads: dict[str, BucketedHead] = {}
        if decoder_buckets:
            self._heads = {h: BucketedHead(getattr(self.models, h), decoder_buckets, graphs=cuda)
                           for h in ("box", "refine")}
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._side_pending = False

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._encoder(images.to(self.device, non_blocking=True)).float()

    @torch.inference_mode()
    def detect(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        x = inputs.to(self.device, non_blocking=True)
        stream = contextlib.nullcontext()
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # the input copy, nothing later
            stream = torch.cuda.stream(self._side)
            self._side_pending = True
        with stream:
            out = self.models.detector(x)
        if self._side is not None:  # the outputs are read on the main stream after join()
            for v in out.values():
                v.record_stream(torch.cuda.current_stream(self.device))
        return out

    def join(self) -> None:
        """Make the current stream wait (on the GPU) for work queued on the side stream."""
        if self._side_pending:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._side_pending = False

    @torch.inference_mode()
    def keypoints(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        self.join()
        return self.models.keypoints(features.to(self.device), rois.to(self.device))

    @torch.inference_mode()
    def decode(
        self,
        head: str,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.join()
        dev = self.device
        points = None if points is None else (points[0].to(dev), points[1].to(dev))
        run = self._heads.get(head) or getattr(self.models, head)
        return run(
            embeddings.to(dev), points=points, boxes=None if boxes is None else boxes.to(dev),
            mask_input=None if mask_input is None else mask_input.to(dev),
        )
