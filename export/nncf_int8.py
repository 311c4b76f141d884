"""int8 graphs on OpenVINO where they hold, in a bf16 folder: ``cp-export onnx --precision bf16
--nncf-int8 GRAPH ...``.

After :mod:`export.bf16` has gated the folder's graphs in bf16, each named graph is quantised by
NNCF's OpenVINO backend and gated once more against fp32:

* **calibration**: the fp32 pipeline (OpenVINO) runs on the user's training images while the
  named graphs' feeds are recorded, as :mod:`export.int8` does for ONNX Runtime;
* **quantisation**: ``nncf.quantize``, with the transformer preset (SmoothQuant, fast bias
  correction) for the transformer graphs. The graph is saved as OpenVINO IR (``NAME.int8.xml``
  and its ``.bin``: the manifest's file and external data); its float operations run in bf16
  where the graph was kept in bf16, else in f32. ONNX Runtime refuses such a folder;
* **gate** (:mod:`export.gate`): each graph swapped in alone (the others fp32), then the ones that
  held together, then the folder as it will run (bf16 and int8 graphs together) once more: bf16
  and int8 errors add up, so when that last check fails no graph is kept in int8.

On the default bundle's encoder, ONNX Runtime's MinMax quantisation lost 0.073 validation mDice;
NNCF's lost 0.0012 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cp_deploy.bundle import Bundle
from cp_deploy.engines.manifest import MANIFEST_FILE, OPENVINO_IR
from cp_deploy.engines.openvino import OpenVINOEngine, import_openvino
from cp_deploy.errors import MissingExtraError
from cp_deploy.models.weights import sha256_file
from export.gate import Gate, GateImages, Reference, Verdict, install_graphs, select_graphs, stage_folder, verdict_line
from export.int8 import load_feeds, record_feeds

LEFT = "as the bf16 gate left it"  # what a refused graph stays in
TRANSFORMERS = ("encoder", "box", "refine")  # quantised with NNCF's transformer preset
# Nodes kept in float, by graph: TinyViT's convolution stage, patch embedding, downsampling,
# depthwise local convolutions and neck. Quantised, they moved LiteMedSAM's masks most: on the 8
# parity images (training split) the least Dice against fp32 rose from 0.9588 to 0.9832 with
# them in float, at 239 against 235 ms per encoder call (2 threads). Other encoders match none.
FLOAT_SCOPES = {"encoder": [r".*patch_embed.*", r".*/layers\.0/.*", r".*downsample.*", r".*local_conv.*",
                            r".*neck.*"]}
METHOD = ("NNCF quantize, OpenVINO backend: int8 weights (per channel) and activations, transformer preset "
          "(SmoothQuant, fast bias correction) for " + ", ".join(TRANSFORMERS) + "; nodes kept in float: "
          + "; ".join(f"{g} {', '.join(p)}" for g, p in FLOAT_SCOPES.items()) + "; float ops as the graph's "
          "bf16 gate decided")


def import_nncf():
    """NNCF; without it, the error names the ``nncf`` extra."""
    try:
        import nncf
    except ImportError as e:
        raise MissingExtraError.for_feature("cp-export onnx --nncf-int8", "nncf") from e
    return nncf


def quantize(model, data: list, graph: str, float_scopes: list[str] | None = None):
    """NNCF's int8 version of the OpenVINO ``model`` of ``graph``, calibrated on ``data`` (its
    feeds); ``float_scopes`` (default :data:`FLOAT_SCOPES`' for the graph) are node-name regexes
    kept in float. Items of ``data`` that are paths are recorded ``.npz`` feeds."""
    nncf = import_nncf()
    nncf.set_log_level(40)  # its notes would bury cp-export's own lines (its progress bars stay)
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if graph in TRANSFORMERS else {}
    scopes = FLOAT_SCOPES.get(graph, []) if float_scopes is None else float_scopes
    if scopes:
        kw["ignored_scope"] = nncf.IgnoredScope(patterns=scopes, validate=False)
    dataset = nncf.Dataset(data, lambda item: load_feeds(item) if isinstance(item, Path) else item)
    return nncf.quantize(model, dataset, subset_size=len(data), **kw)


def quantize_ir(src: Path, dst: Path, graph: str, feeds: list[Path]) -> Path:
    """Write the NNCF int8 version of the ONNX graph ``src`` as the IR ``dst`` (``.xml``),
    calibrated on the recorded ``feeds`` files; returns its ``.bin``."""
    ov = import_openvino()
    ov.save_model(quantize(ov.Core().read_model(str(src)), feeds, graph), str(dst), compress_to_fp16=False)
    return dst.with_suffix(".bin")


def nncf_folder(bundle: Bundle, folder: str | Path, calib: list[np.ndarray], graphs: list[str], images: GateImages,
                gate: Gate | None = None, info: dict | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Verdict]:
    """Quantise ``graphs`` of the bf16 ``folder`` (written by :func:`export.bf16.bf16_folder`), gate
    them as the module docstring says, and move the ones that held into the folder and its
    manifest; returns each graph's verdict. ``info`` goes into the manifest's ``int8`` entry."""
    gate = gate or Gate()
    log = log or (lambda s: print(s, flush=True))
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for stale in folder.glob(".nncf.*.tmp"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".nncf.", suffix=".tmp", dir=folder) as tmp:
        tmp = Path(tmp)
        fp32 = {g: {**e, "precision": "fp32"} for g, e in manifest["graphs"].items()}
        ref = OpenVINOEngine(bundle, onnx_dir=stage_folder(folder, tmp / "fp32", {**manifest, "graphs": fp32}))
        t0 = time.perf_counter()
        feeds = record_feeds(bundle, ref, calib, tmp / "feeds", graphs=graphs).files
        log(f"cp-export: int8 calibration feeds recorded on {len(calib)} images in {time.perf_counter() - t0:.0f} s")
        int8 = tmp / "int8"
        int8.mkdir()
        entries, verdicts = {}, {}
        for name in graphs:
            if not feeds.get(name):
                verdicts[name] = Verdict(float("nan"), float("nan"), "", reason="the pipeline never ran this graph "
                                         "on the calibration images (no instances found?), so nothing calibrates it")
                continue
            t0 = time.perf_counter()
            xml = int8 / f"{name}.int8.xml"
            data = quantize_ir(folder / manifest["graphs"][name]["file"], xml, name, feeds[name])
            log(f"cp-export: {xml.name} quantised by NNCF in {time.perf_counter() - t0:.0f} s")
            entries[name] = {**manifest["graphs"][name], "file": xml.name, "sha256": sha256_file(xml),
                             "external_data": data.name, "external_data_sha256": sha256_file(data),
                             "format": OPENVINO_IR, "precision": "int8",
                             "float_precision": manifest["graphs"][name].get("precision", "fp32")}
        shutil.rmtree(tmp / "feeds")
        # Swapped in alone, each int8 graph runs with its float ops as it will in the folder.
        cand = OpenVINOEngine(bundle, onnx_dir=stage_folder(folder, int8, manifest, entries))
        reference = Reference(bundle, ref, images, gate)
        gated, kept, mixed = select_graphs(reference, cand, list(entries), "int8", log, fallback=LEFT)
        verdicts.update(gated)
        final = None
        if kept:
            whole = stage_folder(folder, tmp / "final", manifest, {g: entries[g] for g in kept}, source=int8)
            final = reference.verdict(OpenVINOEngine(bundle, onnx_dir=whole))
            log(f"cp-export: the folder as it will run (bf16 and int8 together): {verdict_line(final, LEFT)}")
            if final.reason is not None:
                for g in kept:
                    verdicts[g].reason = f"held, but the folder with its bf16 graphs failed: {final.reason}"
                kept = []
        _finish(folder, int8, manifest, entries, verdicts, kept, gate,
                {**(info or {}), **({"mixed": mixed.to_json()} if mixed else {}),
                 **({"folder": final.to_json()} if final else {})})
    return verdicts


def _finish(folder: Path, stage: Path, manifest: dict, entries: dict[str, dict], verdicts: dict[str, Verdict],
            kept: list[str], gate: Gate, info: dict) -> None:
    """Record every verdict, with the kept graphs moved in."""
    graphs = dict(manifest["graphs"])
    for name, verdict in verdicts.items():
        graphs[name] = {**(entries[name] if name in kept else graphs[name]), "int8": verdict.to_json()}
    new = {**manifest, "graphs": graphs,
           "int8": {"method": METHOD, "gate": gate.to_json(),
                    "kept": kept, **info}}
    install_graphs(folder, stage, manifest, new, kept)
