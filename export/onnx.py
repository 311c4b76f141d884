"""Export a bundle's five networks to ONNX, with ``manifest.json``.

Graphs and their tensors (strings are dynamic axes):

=========  ====================================================  ==================================
graph      inputs                                                outputs
=========  ====================================================  ==================================
encoder    images [batch,3,S,S]                                  image_embeddings [batch,C,h,w]
detector   images [batch,3,D,D] or image_embeddings [batch,...]  the detector's ``output_names``:
                                                                 CenterNet heatmap, size, offset
                                                                 [batch,.,H,W]; Grounding DINO
                                                                 logits, boxes [batch,queries,.]
keypoints  features [batch,...], rois [instances,5]              heatmaps [instances,8,H,W]
box        image_embeddings [instances,C,h,w],                   low_res_logits [instances,1,4h,4w],
refine     point_coords [instances,points,2],                    iou_predictions [instances,1]
           point_labels [instances,points],
           mask_input [instances,1,4h,4w], has_mask_input [instances]
=========  ====================================================  ==================================

The decoders take prompts in ``segment_anything/utils/onnx.py``'s form (labels -1 padding, 0/1
points, 2/3 box corners), so one graph serves every prompt mode; the engine converts with
:func:`cp_deploy.models.sam.labelled_prompts`, which also adds SAM's padding point. Pre- and
post-processing stay outside the graphs, shared by every engine.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from cp_deploy.bundle import Bundle
from cp_deploy.engines.manifest import GRAPHS, MANIFEST_FILE, TensorSpec, bundle_sources
from cp_deploy.files import atomic_write_bytes
from cp_deploy.models.build import Models
from cp_deploy.models.registry import detector_family
from cp_deploy.models.weights import sha256_file
from export.precision import HalfPrecision, fp32_normalisation

OPSET = 17
# Protobuf cannot hold a single file over 2 GiB (ViT-H's encoder is 2.5 GB): larger graphs keep
# their weights in a side file ``<graph>.onnx.data``.
EXTERNAL_DATA_BYTES = 1 << 30


class DetectorGraph(nn.Module):
    """The detector with its dict of raw tensors as outputs, in its family's ``output_names`` order."""

    def __init__(self, detector: nn.Module, output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.detector = detector
        self.output_names = tuple(output_names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.detector(x)
        return tuple(out[k] for k in self.output_names)


class DecoderGraph(nn.Module):
    """A prompt head in SAM's ONNX prompt form (see :meth:`PromptHead.forward_labelled`)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        return self.head.forward_labelled(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)


def sample_inputs(bundle: Bundle, models: Models, batch: int = 2, instances: int = 3, points: int = 9,
                  seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of every graph, in valid ranges (used for tracing and for parity)."""
    g = torch.Generator().manual_seed(seed)
    s = bundle.preprocess.image_size
    images = torch.randn(batch, 3, s, s, generator=g)
    with torch.no_grad():
        emb = models.image_encoder(images[:1])
    c, h, w = emb.shape[1:]
    emb = torch.randn(batch, c, h, w, generator=g) * emb.std() + emb.mean()
    det_in = emb
    if bundle.detector.reads == "image":
        d = (bundle.detector.preprocess or bundle.preprocess).image_size
        det_in = torch.randn(batch, 3, d, d, generator=g)
    kp_in = emb
    kp_size = s
    if bundle.keypoints.reads == "image":
        kp_size = (bundle.keypoints.preprocess or bundle.preprocess).image_size
        kp_in = torch.randn(batch, 3, kp_size, kp_size, generator=g)
    xy = torch.rand(instances, 2, generator=g) * kp_size * 0.6
    wh = torch.rand(instances, 2, generator=g) * kp_size * 0.3 + 8
    rois = torch.cat([torch.arange(instances).remainder(batch).float()[:, None], xy, xy + wh], dim=1)
    mh, mw = models.box.mask_input_size
    labels = torch.zeros(instances, points)
    labels[:, -1] = -1.0
    decoder = {
        "image_embeddings": emb[torch.arange(instances) % batch],
        "point_coords": torch.rand(instances, points, 2, generator=g) * s,
        "point_labels": labels,
        "mask_input": torch.randn(instances, 1, mh, mw, generator=g) * 8,
        "has_mask_input": torch.ones(instances),
    }
    det_name = "images" if bundle.detector.reads == "image" else "image_embeddings"
    return {
        "encoder": {"images": images},
        "detector": {det_name: det_in},
        "keypoints": {"features": kp_in, "rois": rois},
        "box": decoder,
        "refine": decoder,
    }


PRECISIONS = ("fp32", "fp16")


def graph_modules(bundle: Bundle, models: Models, precision: str = "fp32") -> dict[str, nn.Module]:
    """The module each graph is traced from. In fp16 every graph but the keypoint net (RoIAlign has
    no fp16 kernel everywhere; HRNet-W32 stays fp32 too) becomes :class:`HalfPrecision`; trace it
    inside :func:`fp32_normalisation`."""
    modules = {
        "encoder": models.image_encoder,
        "detector": DetectorGraph(models.detector, detector_family(bundle.detector.arch).output_names),
        "keypoints": models.keypoints,
        "box": DecoderGraph(models.box),
        "refine": DecoderGraph(models.refine),
    }
    if precision == "fp16":
        modules = {k: v if k == "keypoints" else HalfPrecision(v).eval() for k, v in modules.items()}
    return modules


FIXED_OUTPUTS = {
    "encoder": ["image_embeddings"],
    "keypoints": ["heatmaps"],
    "box": ["low_res_logits", "iou_predictions"],
    "refine": ["low_res_logits", "iou_predictions"],
}


def graph_outputs(bundle: Bundle) -> dict[str, list[str]]:
    """Output names of every graph; the detector's are its family's ``output_names``."""
    return {**FIXED_OUTPUTS, "detector": list(detector_family(bundle.detector.arch).output_names)}


def _dynamic_axes(name: str, inputs: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, dict[int, str]]:
    if name in ("box", "refine"):
        axes = {k: {0: "instances"} for k in inputs}
        axes["point_coords"] = {0: "instances", 1: "points"}
        axes["point_labels"] = {0: "instances", 1: "points"}
        return {**axes, "low_res_logits": {0: "instances"}, "iou_predictions": {0: "instances"}}
    if name == "keypoints":
        return {"features": {0: "batch"}, "rois": {0: "instances"}, "heatmaps": {0: "instances"}}
    return {k: {0: "batch"} for k in [*inputs, *outputs]}


def _specs(names: list[str], tensors: list[torch.Tensor], axes: dict[str, dict[int, str]]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(axes.get(n, {}).get(i, d) for i, d in enumerate(t.shape)))
            for n, t in zip(names, tensors)]


def export_graph(name: str, module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, output_names: list[str],
                 opset: int = OPSET, external_data: bool | None = None) -> dict:
    """Trace ``module`` on ``inputs`` into ``path`` with outputs ``output_names``; returns the
    graph's manifest entry."""
    import onnx

    module = module.eval()
    with torch.no_grad(), fp32_normalisation(module):
        outputs = module(*inputs.values())
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    axes = _dynamic_axes(name, inputs, output_names)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    external = big if external_data is None else external_data
    tmp = path.with_name(path.name + ".partial")
    with warnings.catch_warnings(), fp32_normalisation(module):
        # The tracer warns about Python ints taken from shapes; spatial sizes are fixed per bundle.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs.values()), str(tmp), input_names=list(inputs), output_names=output_names,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    model = onnx.load(str(tmp))
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    if external:  # onnx writes the weights file itself, beside the graph it names it in
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        os.replace(tmp, path)
    else:
        atomic_write_bytes(path, model.SerializeToString())
        tmp.unlink(missing_ok=True)
    if external:
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
    return {
        "file": path.name,
        "external_data": data if external else None,
        "sha256": sha256_file(path),
        # The graph's weights live there: engines check it as they check the graph.
        "external_data_sha256": sha256_file(path.with_name(data)) if external else None,
        "inputs": [s.to_json() for s in _specs(list(inputs), list(inputs.values()), axes)],
        "outputs": [s.to_json() for s in _specs(output_names, list(outputs), axes)],
    }


def export_onnx(bundle: Bundle, models: Models, out: str | Path, opset: int = OPSET,
                external_data: bool | None = None, precision: str = "fp32", progress: bool = True) -> dict:
    """Write the five graphs of ``bundle`` and ``manifest.json`` into ``out``; returns the manifest.

    ``external_data`` forces (``True``) or forbids (``False``) weights in side files; by default
    graphs over 1 GiB of weights get them. ``precision`` ``fp16`` writes half-precision graphs
    with fp32 LayerNorm and softmax (for TensorRT and CUDA; inputs and outputs stay fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    inputs = sample_inputs(bundle, models)
    modules = graph_modules(bundle, models, precision)
    outputs = graph_outputs(bundle)
    graphs = {}
    for name in GRAPHS:
        t0 = time.perf_counter()
        graphs[name] = export_graph(name, modules[name], inputs[name], out / f"{name}.onnx", outputs[name], opset,
                                    external_data)
        if progress:
            print(f"cp-export: {name}.onnx written in {time.perf_counter() - t0:.1f} s", flush=True)
    manifest = {
        "format": "onnx",
        "opset": opset,
        "precision": precision,
        "bundle": str(bundle.root),
        "bundle_name": bundle.name,
        "sources": bundle_sources(bundle),
        "torch": torch.__version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "graphs": graphs,
    }
    write_manifest(out, manifest)
    return manifest


def _remove_previous(out: Path) -> None:
    """Delete the graph files an earlier export's manifest names (an int8 export's ``*.int8.onnx``
    among them), so the folder holds only what the new manifest hashes."""
    try:
        old = json.loads((out / MANIFEST_FILE).read_text())
        names = [g.get(k) for g in old["graphs"].values() for k in ("file", "external_data")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no earlier export, or not one of ours: nothing of it is removed
    for name in names:
        if isinstance(name, str) and name and Path(name).name == name and name not in (".", ".."):
            (out / name).unlink(missing_ok=True)


def write_manifest(folder: str | Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
