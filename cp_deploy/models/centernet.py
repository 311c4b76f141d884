"""CenterNet's outputs, shared by the CenterNet families: decode, ensemble, training targets and loss.

A CenterNet returns three maps per cell of its output grid: ``heatmap`` (a centre logit),
``size`` (log box width and height, in cells) and ``offset`` (the centre's position inside its
cell, through a sigmoid). ``stride`` is input pixels per cell.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from cp_deploy.models.registry import DetectorFamily, from_config

OUTPUT_NAMES = ("heatmap", "size", "offset")
# CenterNet's prior for the heatmap bias: a low centre probability keeps early training stable.
HEATMAP_PRIOR = -2.19


def decode_centernet(
    raw: dict[str, torch.Tensor], stride: float, max_candidates: int = 50
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw CenterNet maps -> per image (Kx4 xyxy boxes in input pixels, K scores), best first.

    Peaks are local maxima of the sigmoid heatmap (3x3 max-pool).
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


def decode(raw: dict[str, torch.Tensor], config: dict, default_stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`decode_centernet` at the bundle config's ``stride`` (else the net's own default)."""
    return decode_centernet(raw, float(config.get("stride", default_stride)))


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
        self.stride = members[0].stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return fuse([m(x) for m in self.members])


def fuse(outs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CenterNet outputs of the same grid fused map by map: the mean centre probability (as a
    logit), log size and offset logit."""
    if len(outs) == 1:
        return outs[0]
    p = torch.stack([torch.sigmoid(o["heatmap"].float()) for o in outs]).mean(0).clamp(1e-6, 1 - 1e-6)
    return {"heatmap": torch.log(p) - torch.log1p(-p),
            "size": torch.stack([o["size"] for o in outs]).mean(0),
            "offset": torch.stack([o["offset"] for o in outs]).mean(0)}


FLIP_DIMS = {"h": (3,), "v": (2,), "hv": (2, 3)}  # a view's flipped axes of an NCHW input


class FlipViews(nn.Module):
    """Test-time flips inside the graph: ``net`` on its input and on each flipped view, every
    view's maps flipped back and :func:`fuse`d. Flipping the input mirrors each centre's cell and
    its position inside the cell, ``1 - offset``, which is the negated offset logit. The padded
    input is flipped whole (the padding moves to the other side), as the maps must line up cell
    for cell. ``net``'s weights keep their names: the wrapper is built after they are loaded."""

    def __init__(self, net: nn.Module, flips: tuple[str, ...]) -> None:
        super().__init__()
        unknown = [f for f in flips if f not in FLIP_DIMS]
        if unknown or not flips:
            raise ValueError(f"flips must be a non-empty list of {', '.join(FLIP_DIMS)}, got {list(flips)}")
        self.net, self.flips, self.stride = net, tuple(flips), net.stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # One call on the views stacked along the batch: exported, each convolution is then one
        # node (OpenVINO fuses its bias, and runs the detector 17% faster than with a call a view).
        views = self.net(torch.cat([x, *(x.flip(FLIP_DIMS[f]) for f in self.flips)]))
        chunks = {k: v.chunk(1 + len(self.flips)) for k, v in views.items()}
        outs = [{k: c[0] for k, c in chunks.items()}]
        for i, f in enumerate(self.flips, start=1):
            dims = FLIP_DIMS[f]
            o = {k: c[i].flip(dims) for k, c in chunks.items()}
            sign = torch.tensor([-1.0 if 3 in dims else 1.0, -1.0 if 2 in dims else 1.0], device=x.device)
            o["offset"] = o["offset"] * sign.to(o["offset"].dtype).view(1, 2, 1, 1)
            outs.append(o)
        return fuse(outs)


def flip_views(net: nn.Module, flips: tuple[str, ...]) -> nn.Module:
    return FlipViews(net, flips)


def centernet_targets(boxes: np.ndarray, grid: tuple[int, int], stride: float) -> dict[str, torch.Tensor]:
    """Input-pixel Kx4 xyxy boxes -> targets on a ``grid`` (rows, columns) of cells: heatmap
    (a Gaussian per box, 1 at its centre cell), size and offset at the centre cells, and ``reg``,
    the mask of those cells."""
    gh, gw = grid
    heat = np.zeros((gh, gw), np.float32)
    size = np.zeros((2, gh, gw), np.float32)
    offset = np.zeros((2, gh, gw), np.float32)
    reg = np.zeros((gh, gw), np.float32)
    ys, xs = np.mgrid[:gh, :gw]
    for x0, y0, x1, y1 in boxes:
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        ix, iy = min(int(cx), gw - 1), min(int(cy), gh - 1)
        sx, sy = max(w / stride / 6, 0.8), max(h / stride / 6, 0.8)
        g = np.exp(-((xs - ix) ** 2) / (2 * sx**2) - ((ys - iy) ** 2) / (2 * sy**2))
        heat = np.maximum(heat, g)
        heat[iy, ix] = 1.0
        size[:, iy, ix] = np.log(w / stride), np.log(h / stride)
        offset[:, iy, ix] = cx - ix, cy - iy
        reg[iy, ix] = 1.0
    maps = (("heatmap", heat[None]), ("size", size), ("offset", offset), ("reg", reg[None]))
    return {k: torch.from_numpy(v) for k, v in maps}


def centernet_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on a Gaussian heatmap target (1 at centres)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def map_loss(raw: dict[str, torch.Tensor], t: dict[str, torch.Tensor], giou: float = 0.0) -> torch.Tensor:
    """CenterNet's loss against batched :func:`centernet_targets`: focal on the heatmap, L1 on log
    size and offset at the centre cells, plus ``giou`` times a GIoU loss of the box those two decode
    to. L1 on log sizes weighs a box's width and height apart; GIoU scores the box as the Dice
    against a GT box will, as a whole."""
    n = t["reg"].sum().clamp(min=1)
    size = (F.l1_loss(raw["size"], t["size"], reduction="none") * t["reg"]).sum() / n
    off = (F.l1_loss(torch.sigmoid(raw["offset"]), t["offset"], reduction="none") * t["reg"]).sum() / n
    loss = centernet_focal(raw["heatmap"], t["heatmap"]) + 0.5 * size + off
    if giou:
        cells = t["reg"][:, 0] > 0  # B x H x W
        pred = _cell_boxes(torch.sigmoid(raw["offset"].float()), raw["size"].float().clamp(-10, 10), cells)
        gt = _cell_boxes(t["offset"], t["size"], cells)
        loss = loss + giou * generalized_box_iou_loss(pred, gt, reduction="sum") / n
    return loss


def _cell_boxes(offset: torch.Tensor, log_size: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Nx4 xyxy boxes, in cells relative to their own cell, decoded at the ``cells`` positions."""
    c = offset.permute(0, 2, 3, 1)[cells]
    wh = torch.exp(log_size.permute(0, 2, 3, 1)[cells])
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def loss(net: nn.Module, inputs: torch.Tensor, boxes: list[torch.Tensor], giou: float = 0.0) -> torch.Tensor:
    """The training loss of a CenterNet ``net`` (possibly wrapped in DistributedDataParallel) on a
    batch of its inputs, against per-image Kx4 xyxy boxes in input pixels (see :func:`map_loss`)."""
    raw = net(inputs)
    stride = getattr(net, "module", net).stride
    grid = tuple(raw["heatmap"].shape[-2:])
    maps = [centernet_targets(np.asarray(b.detach().cpu(), dtype=np.float64).reshape(-1, 4), grid, stride)
            for b in boxes]
    device = raw["heatmap"].device
    targets = {k: torch.stack([m[k] for m in maps]).to(device) for k in maps[0]}
    return map_loss(raw, targets, giou)


def family(name: str, reads: str, net: Callable[..., nn.Module], default_stride: int,
           default_config: Callable[..., dict]) -> DetectorFamily:
    """The spec of a CenterNet family: ``net`` (built from the config's keys) with CenterNet's
    outputs, decode, loss and ensemble."""
    return DetectorFamily(name=name, reads=reads, output_names=OUTPUT_NAMES, build=from_config(net),
                          decode=partial(decode, default_stride=default_stride), loss=loss,
                          default_config=default_config, ensemble=CenterNetEnsemble, flip_views=flip_views)
