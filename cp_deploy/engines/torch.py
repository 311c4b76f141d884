"""PyTorch engine: eager (optionally compiled) modules on the CPU or a CUDA device.

``precision`` ``bf16``/``fp16`` runs the image encoder (nearly all the FLOPs) under autocast, which
keeps LayerNorm and softmax in fp32 (SAM's LayerNorm overflows in fp16); the detector, keypoint
net and decoders stay fp32, since their thresholds decide instances and mask borders and they
cost little. Outputs are fp32 either way. ``sdpa`` (default: on CUDA)
swaps SAM ViT attention for the equivalent SDPA form (same parameters). On CUDA, ``detect`` runs on a
side stream, so a caller that queues an image-reading detector before ``encode`` overlaps the two;
``join`` makes the main stream wait for the side stream on the GPU (no ``synchronize``). The
pipeline does not: its stage timers synchronise the device, so each stage's time is its own.
"""

from __future__ import annotations

import contextlib

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.models.attention import use_sdpa_attention
from cp_deploy.models.build import Models, build_models

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine:
    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        models: Models | None = None,
        precision: str = "fp32",
        sdpa: bool | None = None,
        compile: bool = False,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.models = models or build_models(bundle)
        for name in ("image_encoder", "box", "refine", "detector", "keypoints"):
            getattr(self.models, name).to(self.device).eval()
        # SDPA pays on GPUs; on the CPU segment-anything's own attention keeps results bit-identical
        # whatever the batch composition and thread count (the executors' outputs are compared exactly).
        if self.device.type == "cuda" if sdpa is None else sdpa:
            use_sdpa_attention(self.models.image_encoder)
        self._encoder = self.models.image_encoder
        if compile:
            # Fixed input sizes per bundle: one graph per batch size, CUDA graphs where shapes repeat.
            self._encoder = torch.compile(self._encoder, mode="max-autotune-no-cudagraphs" if
                                          self.device.type == "cpu" else "reduce-overhead", dynamic=False)
        cuda = self.device.type == "cuda"
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
        return getattr(self.models, head)(
            embeddings.to(dev), points=points, boxes=None if boxes is None else boxes.to(dev),
            mask_input=None if mask_input is None else mask_input.to(dev),
        )
