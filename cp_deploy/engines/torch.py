"""PyTorch engine: eager modules, fp32, on the CPU or a CUDA device."""

from __future__ import annotations

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.models.build import Models, build_models


class TorchEngine:
    def __init__(self, bundle: Bundle, device: str = "cpu", models: Models | None = None) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
        self.device = torch.device(device)
        self.models = models or build_models(bundle)
        for name in ("image_encoder", "box", "refine", "detector", "keypoints"):
            getattr(self.models, name).to(self.device).eval()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.models.image_encoder(images.to(self.device))

    @torch.inference_mode()
    def detect(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.models.detector(inputs.to(self.device))

    @torch.inference_mode()
    def keypoints(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
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
        dev = self.device
        points = None if points is None else (points[0].to(dev), points[1].to(dev))
        return getattr(self.models, head)(
            embeddings.to(dev), points=points, boxes=None if boxes is None else boxes.to(dev),
            mask_input=None if mask_input is None else mask_input.to(dev),
        )
