"""int8 graphs where they hold: static post-training quantisation of the exported fp32 graphs,
graph by graph, each kept only if it passes a parity gate against fp32.

* **calibration**: the fp32 pipeline (ONNX Runtime) runs on the user's training images while
  every graph call's feeds are recorded, so each graph is calibrated on the inputs it really gets
  (the decoders on the detector's boxes and the keypoint net's points);
* **quantisation**: ONNX Runtime's ``quantize_static`` in QDQ form (per-channel int8 weights,
  uint8 activations, MinMax ranges). QDQ graphs run on ONNX Runtime and OpenVINO alike
  (OpenVINO on its int8 kernels, f32 hint or not). NNCF 3.4's ONNX backend was measured too: its
  graphs ran slower than fp32 on ONNX Runtime, and its encoder did not compile on OpenVINO (its
  OpenVINO backend serves :mod:`export.nncf_int8`);
* **gate** (:mod:`export.gate`): each int8 graph is swapped in alone (the others fp32) and the
  pipeline runs on the parity images and, where given, the validation set. The graph stays int8
  only if every parity image's final mask has Dice >= ``Gate.min_dice`` against fp32's and
  validation mDice is within ``Gate.max_mdice_drop`` of fp32's; the graphs that passed are then
  checked together the same way. ``manifest.json`` records each graph's precision and figures,
  and for a graph that stays fp32 the measured reason.

A kept graph's fp32 file is removed, so the folder holds exactly the files the manifest hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cp_deploy.bundle import Bundle
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS, MANIFEST_FILE
from cp_deploy.engines.onnxruntime import OnnxRuntimeEngine
from cp_deploy.errors import InputError, MissingExtraError
from cp_deploy.files import atomic_write_bytes, discover_images, read_image
from cp_deploy.models.weights import sha256_file
from export.gate import (
    Gate,
    GateImages,
    MixedEngine,
    Reference,
    Verdict,
    install_graphs,
    link_or_copy,
    pipeline_masks,
    select_graphs,
)
from export.onnx import write_manifest

INT8_SUFFIX = ".int8.onnx"
CALIB_IMAGES = 64  # default count of calibration images (the CLI's --calib-count)
# The ops with int8 kernels worth having. Quantising every op (ONNX Runtime's default) also wraps
# the encoder's element-wise GELU and attention pieces: calibrating those took over 7 GB for one
# image of the default bundle's TinyViT.
OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
METHOD = ("onnxruntime quantize_static: QDQ around " + ", ".join(OPS) + "; per-channel int8 weights, "
          "uint8 activations, MinMax ranges")

Feeds = dict[str, np.ndarray]


def quantization_tools():
    """ONNX Runtime's quantisation modules; without them, the error names the ``onnx`` extra."""
    try:
        # Module imports, not ``from onnxruntime import``: they consult sys.modules every time.
        import onnxruntime.quantization as quantization
        import onnxruntime.quantization.shape_inference as shape_inference
    except ImportError as e:
        raise MissingExtraError.for_feature("cp-export onnx --precision int8", "onnx") from e
    return quantization, shape_inference


def calibration_images(folder: str | Path, count: int = CALIB_IMAGES) -> tuple[list[np.ndarray], list[str]]:
    """At most ``count`` images of ``folder``, evenly spread over its sorted listing."""
    fix = "pass --calib-images a folder of training images"
    if not Path(folder).is_dir():
        raise InputError(f"--calib-images '{folder}' is not a folder; {fix}")
    try:
        files = discover_images(folder)
    except InputError as e:  # its message speaks of cp-deploy's --input
        raise InputError(f"--calib-images '{folder}': no images to calibrate on ({str(e).split(';')[0]}); {fix}") from e
    pick = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(count, len(files)))})
    names = [files[i] for i in pick]
    return [read_image(Path(folder) / n) for n in names], names


class FeedStore:
    """Every recorded call's feeds, one ``.npz`` file each in ``folder``: kept off the heap, as the
    decoders' feeds alone (an image embedding per instance) come to GBs on 64 images."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, list[Path]] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, graph: str, feeds: Feeds) -> None:
        files = self.files.setdefault(graph, [])
        files.append(self.folder / f"{graph}-{len(files):05d}.npz")
        np.savez(files[-1], **feeds)


def load_feeds(path: Path) -> Feeds:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def record_feeds(bundle: Bundle, engine: GraphEngine, images: list[np.ndarray], folder: Path,
                 graphs: list[str] | None = None) -> FeedStore:
    """Each graph's feeds (of ``graphs``, default all) while the pipeline runs ``engine`` on
    ``images``, one image per call: the calibrator then holds one image's activations at a time
    (a batch of 4 took 10 GB for the default encoder)."""
    store = FeedStore(folder)

    def record(graph: str, feeds: Feeds) -> None:
        if graphs is None or graph in graphs:
            store.add(graph, feeds)

    pipeline_masks(bundle, MixedEngine(engine, record=record), images, batch=1)
    return store


def quantize_graph(src: Path, dst: Path, feeds: list[Path]) -> Path | None:
    """Write the int8 QDQ version of the graph ``src`` to ``dst``, calibrated on the recorded
    ``feeds`` files; returns its external-data file where the fp32 graph has one (over 2 GiB)."""
    quantization, shape_inference = quantization_tools()
    external = src.with_name(src.name + ".data").is_file()

    class Reader(quantization.CalibrationDataReader):
        """The recorded feeds; ``set_range`` lets the calibrator take them one call at a time."""

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(feeds[start_index:end_index])

        def get_next(self) -> Feeds | None:
            path = next(self.items, None)
            return None if path is None else load_feeds(path)

    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent) as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / dst.name
        # ONNX Runtime's advice before quantising: shapes inferred, constants folded, ops fused.
        shape_inference.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True,
                                          save_as_external_data=external)
        reader = Reader()
        reader.set_range(0, len(feeds))
        quantization.quantize_static(
            str(pre), str(out), reader, quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=OPS,
            per_channel=True, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, calibrate_method=quantization.CalibrationMethod.MinMax,
            use_external_data_format=external,
            # Ranges merged after every recorded call: the calibrator otherwise holds every calibrated
            # activation of every call at once.
            extra_options={"CalibStridedMinMax": 1},
        )
        data = out.with_name(out.name + ".data")
        if data.is_file():
            os.replace(data, dst.with_name(data.name))
        atomic_write_bytes(dst, out.read_bytes())
    return dst.with_name(data.name) if external else None


def quantize_folder(bundle: Bundle, folder: str | Path, calib: list[np.ndarray], images: GateImages,
                    gate: Gate | None = None, info: dict | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Verdict]:
    """Quantise every fp32 graph of ``folder`` (written by :func:`export.onnx.export_onnx`), gate
    each as the module docstring says, and rewrite the folder and its manifest with the graphs
    that held; returns each graph's verdict. ``info`` goes into the manifest's ``int8`` entry."""
    gate = gate or Gate()
    log = log or (lambda s: print(s, flush=True))
    folder = Path(folder)
    ref = OnnxRuntimeEngine(bundle, onnx_dir=folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for stale in folder.glob(".int8.*.tmp"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    verdicts: dict[str, Verdict] = {}
    with tempfile.TemporaryDirectory(prefix=".int8.", suffix=".tmp", dir=folder) as tmp:
        stage = Path(tmp)
        t0 = time.perf_counter()
        feeds = record_feeds(bundle, ref, calib, stage / "feeds").files
        log(f"cp-export: int8 calibration feeds recorded on {len(calib)} images in {time.perf_counter() - t0:.0f} s")
        staged = {**manifest, "graphs": {}}
        quantised = []
        for name in GRAPHS:
            entry = dict(manifest["graphs"][name])
            src = folder / entry["file"]
            if not feeds.get(name):
                # Nothing to calibrate on; the engine still needs the graph, so the fp32 one stands in.
                verdicts[name] = Verdict(float("nan"), float("nan"), "", reason="the pipeline never ran this graph "
                                         "on the calibration images (no instances found?), so nothing calibrates it")
                for f in (entry["file"], entry.get("external_data")):
                    if f:
                        link_or_copy(folder / f, stage / f)
                staged["graphs"][name] = entry
                continue
            t0 = time.perf_counter()
            dst = stage / f"{name}{INT8_SUFFIX}"
            data = quantize_graph(src, dst, feeds[name])
            log(f"cp-export: {dst.name} quantised in {time.perf_counter() - t0:.0f} s")
            entry.update(file=dst.name, sha256=sha256_file(dst), external_data=data.name if data else None,
                         external_data_sha256=sha256_file(data) if data else None)
            staged["graphs"][name] = entry
            quantised.append(name)
        shutil.rmtree(stage / "feeds")  # calibrated: GBs of disk freed before the gate runs
        write_manifest(stage, staged)
        cand = OnnxRuntimeEngine(bundle, onnx_dir=stage)

        gated, kept, mixed = select_graphs(Reference(bundle, ref, images, gate), cand, quantised, "int8", log)
        verdicts.update(gated)
        if mixed is not None:
            info = {**(info or {}), "mixed": mixed.to_json()}
        _finish(folder, stage, manifest, staged, verdicts, kept, gate, info or {})
    return verdicts


def _finish(folder: Path, stage: Path, manifest: dict, staged: dict, verdicts: dict[str, Verdict],
            kept: list[str], gate: Gate, info: dict) -> None:
    """Record every graph's precision and verdict, with the kept int8 graphs moved in."""
    graphs = {}
    for name in GRAPHS:
        entry = dict(staged["graphs"][name] if name in kept else manifest["graphs"][name])
        entry["precision"] = "int8" if name in kept else "fp32"
        if name in verdicts:
            entry["int8"] = verdicts[name].to_json()
        graphs[name] = entry
    new = {**manifest, "graphs": graphs, "precision": "int8" if kept else "fp32",
           "int8": {"method": METHOD, "gate": gate.to_json(),
                    "kept": kept, **info}}
    install_graphs(folder, stage, manifest, new, kept)
