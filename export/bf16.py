"""bf16 graphs where they hold: the exported fp32 graphs run by OpenVINO with its bf16 inference
hint, graph by graph, each kept only if it passes the gate of :mod:`export.gate` against fp32.

The files stay the fp32 ONNX graphs; the manifest marks a kept graph ``"precision": "bf16"``, and
:class:`~cp_deploy.engines.openvino.OpenVINOEngine` compiles it with the hint. Matrix products
and convolutions then run on the CPU's bf16 instructions (AVX512-BF16 or AMX) with fp32
accumulation, about twice as fast as fp32 on the 2-core AMD EPYC this project is measured on.
The gate needs those instructions on the exporting machine: without them OpenVINO runs a bf16
hint in f32, the masks would equal fp32's, and the gate would prove nothing, so it refuses.
Such a folder runs on ``--engine openvino`` only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from cp_deploy.bundle import Bundle
from cp_deploy.engines.manifest import GRAPHS, MANIFEST_FILE
from cp_deploy.engines.openvino import OpenVINOEngine
from cp_deploy.errors import EngineError
from export.gate import Gate, GateImages, Reference, Verdict, select_graphs, stage_folder
from export.onnx import write_manifest

METHOD = "OpenVINO CPU plugin, INFERENCE_PRECISION_HINT bf16 on the fp32 ONNX graph"
NO_BF16 = ("cp-export onnx --precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so "
           "OpenVINO would run the graphs in f32 and the gate could not measure bf16; export on a CPU that "
           "has them, or use --precision int8 or fp32 here")


def bf16_folder(bundle: Bundle, folder: str | Path, images: GateImages, gate: Gate | None = None,
                info: dict | None = None, log: Callable[[str], None] | None = None) -> dict[str, Verdict]:
    """Gate every fp32 graph of ``folder`` (written by :func:`export.onnx.export_onnx`) in bf16 on
    OpenVINO, and record in its manifest which graphs run in bf16; returns each graph's verdict.
    ``info`` goes into the manifest's ``bf16`` entry."""
    gate = gate or Gate()
    log = log or (lambda s: print(s, flush=True))
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    ref = OpenVINOEngine(bundle, onnx_dir=folder)
    with tempfile.TemporaryDirectory(prefix=".bf16.", suffix=".tmp", dir=folder) as tmp:
        all_bf16 = {g: {**e, "precision": "bf16"} for g, e in manifest["graphs"].items()}
        cand = OpenVINOEngine(bundle, onnx_dir=stage_folder(folder, Path(tmp), {**manifest, "graphs": all_bf16}))
        if any(p != "bf16" for p in cand.precisions.values()):  # the plugin ran the hint in f32
            raise EngineError(NO_BF16)
        verdicts, kept, mixed = select_graphs(Reference(bundle, ref, images, gate), cand, list(GRAPHS), "bf16", log)
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        entry["precision"] = "bf16" if name in kept else "fp32"
        entry["bf16"] = verdicts[name].to_json()
    manifest["precision"] = "bf16" if kept else "fp32"
    manifest["bf16"] = {"method": METHOD, "gate": gate.to_json(),
                        "kept": kept, **(info or {}), **({"mixed": mixed.to_json()} if mixed else {})}
    write_manifest(folder, manifest)
    return verdicts
