"""The Engine protocol over exported graphs: what the ONNX Runtime, OpenVINO and TensorRT engines share.

Subclasses load the five graphs of one folder and implement :meth:`GraphEngine.run`; the
protocol's methods only name the graph and its tensors (as ``manifest.json`` lists them), and the
decoders get SAM's ONNX prompt form from :func:`labelled_prompts`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cp_deploy.engines.manifest import load_graph_folder
from cp_deploy.models.sam import labelled_prompts

# Manifest dtype -> (numpy, torch) dtype.
DTYPES = {"float32": (np.float32, torch.float32), "int64": (np.int64, torch.int64)}


class GraphEngine:
    manifest: dict
    device: torch.device
    mask_size: tuple[int, int]

    def load_onnx_folder(self, bundle, onnx_dir: str | Path | None) -> tuple[str, dict[str, Path]]:
        """Check the folder of ONNX graphs ``cp-export onnx`` wrote (``BUNDLE/onnx`` by default) as
        :func:`load_graph_folder` does; sets :attr:`folder`, :attr:`manifest` and :attr:`mask_size`,
        and returns the rebuild hint and each graph's path."""
        self.folder = Path(onnx_dir) if onnx_dir is not None else bundle.root / "onnx"
        hint = f"export them with: cp-export onnx --bundle {bundle.root} --out {self.folder}"
        self.manifest, paths = load_graph_folder(self.folder, bundle, hint)
        self.mask_size = tuple(self.manifest["graphs"]["box"]["inputs"][3].shape[-2:])
        return hint, paths

    def numpy_feeds(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs as host arrays of the dtypes its manifest records."""
        return {t.name: feeds[t.name].detach().cpu().numpy().astype(DTYPES[t.dtype][0], copy=False)
                for t in self.manifest["graphs"][graph]["inputs"]}

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
