"""The detector interface and its small CenterNet-style implementation on the SAM embedding.

A detector is an ``nn.Module`` whose ``forward`` maps a batch (the preprocessed image or the SAM
image embedding, as its ``reads`` says) to a dict of raw tensors named by its ``output_names``
(the exported graph's outputs, in that order), plus a pure decode, chosen per arch by
:func:`decode_detections`, that turns them into candidate boxes (xyxy, in the pixels of the
detector's input frame) with scores. Keeping decoding outside ``forward`` lets every engine
(torch, ONNX Runtime, TensorRT) share it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

READS = ("image", "embedding")


class EmbeddingCenterNet(nn.Module):
    """CenterNet head on the frozen SAM embedding: a centre heatmap, box size and sub-cell offset
    per embedding cell. ``stride`` is model-input pixels per embedding cell."""

    reads = "embedding"
    output_names = ("heatmap", "size", "offset")

    def __init__(self, in_channels: int = 256, hidden: int = 64, stride: int = 4) -> None:
        super().__init__()
        self.stride = stride
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.heatmap = nn.Conv2d(hidden, 1, 1)
        self.size = nn.Conv2d(hidden, 2, 1)
        self.offset = nn.Conv2d(hidden, 2, 1)
        # CenterNet's prior: start with a low centre probability so early training is stable.
        nn.init.constant_(self.heatmap.bias, -2.19)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {"heatmap": self.heatmap(f), "size": self.size(f), "offset": self.offset(f)}


def decode_centernet(
    raw: dict[str, torch.Tensor], stride: float, max_candidates: int = 50
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw CenterNet maps -> per image (Kx4 xyxy boxes in input pixels, K scores), best first.

    Peaks are local maxima of the sigmoid heatmap (3x3 max-pool). ``size`` holds log box width
    and height in cells; ``offset`` the centre's position inside its cell, through a sigmoid.
    """
    heat = torch.sigmoid(raw["heatmap"].float())
    peaks = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))
    b, _, h, w = heat.shape
    k = min(max_candidates, h * w)
    scores, idx = peaks.view(b, -1).topk(k, dim=1)
    ys = torch.div(idx, w, rounding_mode="floor")
    xs = idx % w
    out = []
    for i in range(b):
        off = torch.sigmoid(raw["offset"][i].float()).view(2, -1)[:, idx[i]]
        wh = torch.exp(raw["size"][i].float().clamp(-10, 10)).view(2, -1)[:, idx[i]] * stride
        cx = (xs[i].float() + off[0]) * stride
        cy = (ys[i].float() + off[1]) * stride
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], dim=1)
        keep = scores[i] > 0
        out.append((boxes[keep], scores[i][keep]))
    return out


class CenterNetEnsemble(nn.Module):
    """N CenterNets of one arch on the same input, fused map by map into one CenterNet output:
    the mean of the centre probabilities (returned as a logit), of the log sizes and of the offset
    logits. The fusion is inside ``forward``, so decoding, engines and the exported graph stay those
    of a single CenterNet. Independently trained members disagree most on the hard images'
    box extents, which averaging evens out (docs/TRAINING.md has the measurements); their weights
    cannot be averaged instead: runs from the same ImageNet start end in different basins."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.reads, self.output_names = members[0].reads, members[0].output_names
        self.stride = members[0].stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [m(x) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        p = torch.stack([torch.sigmoid(o["heatmap"].float()) for o in outs]).mean(0).clamp(1e-6, 1 - 1e-6)
        return {"heatmap": torch.log(p) - torch.log1p(-p),
                "size": torch.stack([o["size"] for o in outs]).mean(0),
                "offset": torch.stack([o["offset"] for o in outs]).mean(0)}


DETECTOR_ARCHS = ("embedding_centernet", "lite0_centernet", "grounding_dino")
# Detectors conditioned on the bundle's ``prompt.text`` (baked into their exported graphs).
TEXT_PROMPTED = ("grounding_dino",)


def build_detector(arch: str, config: dict, text: str = "polyp", root: str | Path | None = None) -> nn.Module:
    """A detector from its bundle entry (``arch`` and ``config``). ``text`` is the bundle's prompt
    (for text-prompted detectors); relative paths in ``config`` are resolved against ``root``."""
    if arch in ("embedding_centernet", "lite0_centernet"):
        cfg = dict(config)
        members = int(cfg.pop("members", 1))  # > 1: an ensemble, its weights prefixed members.I.
        if members > 1:
            return CenterNetEnsemble([build_detector(arch, cfg) for _ in range(members)])
        if arch == "embedding_centernet":
            return EmbeddingCenterNet(**cfg)
        from cp_deploy.models.efficientnet import Lite0CenterNet

        return Lite0CenterNet(**cfg)
    if arch == "grounding_dino":
        from cp_deploy.models.grounding_dino import GroundingDinoDetector

        cfg = dict(config)
        for key in ("tokenizer", "pretrained"):
            if cfg.get(key) is not None and root is not None:
                cfg[key] = Path(root) / cfg[key]  # an absolute path stays as it is
        return GroundingDinoDetector(text, **cfg)
    raise ValueError(f"unknown detector arch {arch!r}; known: {', '.join(DETECTOR_ARCHS)}")


def decode_detections(arch: str, raw: dict[str, torch.Tensor], config: dict
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The decode of detector ``arch`` (with its bundle ``config``): raw outputs -> per image
    (Kx4 xyxy boxes in the detector's input pixels, K scores), best first."""
    if arch == "grounding_dino":
        from cp_deploy.models.grounding_dino import decode_grounding_dino

        return decode_grounding_dino(raw)
    return decode_centernet(raw, float(config.get("stride", 1)))
