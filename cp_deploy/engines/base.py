"""The one interface every engine implements."""

from __future__ import annotations

from typing import Protocol

import torch


class Engine(Protocol):
    """Runs the bundle's five networks. Inputs and outputs are torch tensors on ``device``."""

    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS preprocessed images -> BxCxhxw SAM image embeddings."""

    def detect(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detector's input (images or embeddings, as it reads) -> its raw output maps."""

    def join(self) -> None:
        """Make later work wait for outputs the engine queued on its own streams (a no-op for
        engines that finish each call before returning)."""

    def keypoints(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Features (images or embeddings) and Nx5 crops -> Nx8xHxW heatmap logits."""

    def decode(
        self,
        head: str,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``box`` or ``refine`` head on per-instance embeddings -> (low-res logits, IoU)."""
