"""The Engine protocol over exported graphs: what the ONNX Runtime and TensorRT engines share.

Subclasses load the five graphs of one folder and implement :meth:`GraphEngine.run`; the
protocol's methods only name the graph and its tensors (as ``manifest.json`` lists them), and the
decoders get SAM's ONNX prompt form from :func:`labelled_prompts`.
"""

from __future__ import annotations

import torch

from cp_deploy.models.sam import labelled_prompts


class GraphEngine:
    manifest: dict
    device: torch.device
    mask_size: tuple[int, int]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run one graph; inputs and outputs are torch tensors (outputs on :attr:`device`)."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.run("encoder", {"images": images})[0]

    def detect(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        graph = self.manifest["graphs"]["detector"]
        outs = self.run("detector", {graph["inputs"][0].name: inputs})
        return {t.name: y for t, y in zip(graph["outputs"], outs)}

    def join(self) -> None:
        """Every call has finished, or is ordered on the caller's stream, when it returns."""

    def keypoints(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.run("keypoints", {"features": features, "rois": rois})[0]

    def decode(
        self,
        head: str,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = labelled_prompts(len(embeddings), self.mask_size, points, boxes, mask_input, self.device)
        logits, iou = self.run(head, {"image_embeddings": embeddings, **feeds})
        return logits, iou
