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
from export.gate import (
    Gate,
    GateImages,
    Verdict,
    install_graphs,
    judge,
    link_or_copy,
    pipeline_masks,
    select_graphs,
    verdict_line,
)
from export.int8 import load_feeds, record_feeds
from export.onnx import write_manifest

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


def quantize_ir(src: Path, dst: Path, graph: str, feeds: list[Path]) -> Path:
    """Write the NNCF int8 version of the ONNX graph ``src`` as the IR ``dst`` (``.xml``),
    calibrated on the recorded ``feeds`` files; returns its ``.bin``."""
    nncf, ov = import_nncf(), import_openvino()
    nncf.set_log_level(40)  # its progress bars and notes would bury cp-export's own lines
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if graph in TRANSFORMERS else {}
    if graph in FLOAT_SCOPES:
        kw["ignored_scope"] = nncf.IgnoredScope(patterns=FLOAT_SCOPES[graph], validate=False)
    model = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(feeds, load_feeds), subset_size=len(feeds), **kw)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst.with_suffix(".bin")


def _stage(folder: Path, stage: Path, manifest: dict, graphs: dict | None = None) -> Path:
    """``stage``: the folder's graph files (hard links) under ``manifest``, with ``graphs``' entries
    replaced (their files already in ``stage``)."""
    stage.mkdir(parents=True, exist_ok=True)
    graphs = graphs or {}
    for name, entry in manifest["graphs"].items():
        if name not in graphs:
            for f in (entry["file"], entry.get("external_data")):
                if f and not (stage / f).exists():
                    link_or_copy(folder / f, stage / f)
    write_manifest(stage, {**manifest, "graphs": {**manifest["graphs"], **graphs}})
    return stage


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
        ref = OpenVINOEngine(bundle, onnx_dir=_stage(folder, tmp / "fp32", {**manifest, "graphs": fp32}))
        t0 = time.perf_counter()
        feeds = record_feeds(bundle, ref, calib, tmp / "feeds", graphs=graphs).files
        log(f"cp-export: int8 calibration feeds recorded on {len(calib)} images in {time.perf_counter() - t0:.0f} s")
        (tmp / "int8").mkdir()
        entries, verdicts = {}, {}
        for name in graphs:
            if not feeds.get(name):
                verdicts[name] = Verdict(float("nan"), float("nan"), "", reason="the pipeline never ran this graph "
                                         "on the calibration images (no instances found?), so nothing calibrates it")
                continue
            t0 = time.perf_counter()
            xml = tmp / "int8" / f"{name}.int8.xml"
            data = quantize_ir(folder / manifest["graphs"][name]["file"], xml, name, feeds[name])
            log(f"cp-export: {xml.name} quantised by NNCF in {time.perf_counter() - t0:.0f} s")
            entries[name] = {**manifest["graphs"][name], "file": xml.name, "sha256": sha256_file(xml),
                             "external_data": data.name, "external_data_sha256": sha256_file(data),
                             "format": OPENVINO_IR, "precision": "int8",
                             "float_precision": manifest["graphs"][name].get("precision", "fp32")}
        shutil.rmtree(tmp / "feeds")
        # Swapped in alone, each int8 graph runs with its float ops as it will in the folder.
        cand = OpenVINOEngine(bundle, onnx_dir=_stage(folder, tmp / "int8", manifest, entries))
        gated, kept, mixed = select_graphs(bundle, ref, cand, list(entries), images, gate, "int8", log,
                                           fallback=LEFT)
        verdicts.update(gated)
        final = None
        if kept:
            final_stage = _stage(folder, tmp / "final", manifest, {g: entries[g] for g in kept})
            for g in kept:
                for f in (entries[g]["file"], entries[g]["external_data"]):
                    link_or_copy(tmp / "int8" / f, final_stage / f)
            final = _whole_folder(bundle, ref, OpenVINOEngine(bundle, onnx_dir=final_stage), images, gate)
            log(f"cp-export: the folder as it will run (bf16 and int8 together): {verdict_line(final, LEFT)}")
            if final.reason is not None:
                for g in kept:
                    verdicts[g].reason = f"held, but the folder with its bf16 graphs failed: {final.reason}"
                kept = []
        _finish(folder, tmp / "int8", manifest, entries, verdicts, kept, gate,
                {**(info or {}), **({"mixed": mixed.to_json()} if mixed else {}),
                 **({"folder": final.to_json()} if final else {})})
    return verdicts


def _whole_folder(bundle: Bundle, ref: OpenVINOEngine, engine: OpenVINOEngine, images: GateImages,
                  gate: Gate) -> Verdict:
    """The gate's verdict on ``engine``'s masks, every graph as it will run, against fp32's."""
    ref_masks, ref_val = pipeline_masks(bundle, ref, images.images), pipeline_masks(bundle, ref, images.val_images)
    got, got_val = pipeline_masks(bundle, engine, images.images), pipeline_masks(bundle, engine, images.val_images)
    return judge(ref_masks, got, images, gate, ref_val, got_val)


def _finish(folder: Path, stage: Path, manifest: dict, entries: dict[str, dict], verdicts: dict[str, Verdict],
            kept: list[str], gate: Gate, info: dict) -> None:
    """Record every verdict, with the kept graphs moved in."""
    graphs = dict(manifest["graphs"])
    for name, verdict in verdicts.items():
        graphs[name] = {**(entries[name] if name in kept else graphs[name]), "int8": verdict.to_json()}
    new = {**manifest, "graphs": graphs,
           "int8": {"method": METHOD, "gate": {"min_dice": gate.min_dice, "max_mdice_drop": gate.max_mdice_drop},
                    "kept": kept, **info}}
    install_graphs(folder, stage, manifest, new, kept)
