"""Executors drive the pipeline over a folder: the local one streams through threads, the Ray one
through a Ray Data actor pool. Both build the pipeline with :class:`PipelineFactory`."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cp_deploy import __version__
from cp_deploy.bundle import BUNDLE_FILE, Bundle, PromptSettings, load_bundle
from cp_deploy.engines.manifest import MANIFEST_FILE
from cp_deploy.engines.openvino import CPU_ONLY as OPENVINO_CPU_ONLY
from cp_deploy.errors import EngineError, InputError
from cp_deploy.executors.output import RunSettings
from cp_deploy.models.weights import sha256_file
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions

GRAPH_FOLDERS = {"onnxruntime": "onnx", "openvino": "onnx", "trt": "trt"}  # the default --graphs inside a bundle
ENGINE_NAMES = {"TorchEngine": "torch", "OnnxRuntimeEngine": "onnxruntime", "OpenVINOEngine": "openvino",
                "TensorRTEngine": "trt"}


def run_settings(bundle: Bundle, engine: str, graphs: Path | None, precision: str, options: PipelineOptions,
                 slice_axis: int | None, device: str = "cpu") -> RunSettings:
    """What decides a run's masks, recorded in ``run.json`` so ``--resume`` can refuse to mix
    masks of other settings: the bundle (its ``bundle.json`` records every weight file's hash),
    the engine and its graphs, the precision, the prompt settings after the bundle's defaults,
    and the read options that change frames. Threads, workers, model workers, batch size and compile do not.

    Its ``provenance`` (:func:`provenance`) says who made the masks and is never compared."""
    manifest = graphs / MANIFEST_FILE if graphs is not None else None
    spec = Path(bundle.root) / BUNDLE_FILE  # missing only for a Bundle built in memory
    prompt = {k: getattr(bundle.prompt, k) if getattr(options, k) is None else getattr(options, k)
              for k in PromptSettings.__dataclass_fields__ if k != "text"}  # text: part of bundle.json
    settings = RunSettings({
        "bundle": str(Path(bundle.root).resolve()),
        "bundle_sha256": sha256_file(spec) if spec.is_file() else None,
        "engine": engine,
        "graphs_manifest_sha256": sha256_file(manifest) if manifest is not None and manifest.is_file() else None,
        "precision": precision if engine == "torch" else None,  # graphs carry their own precision
        "prompts": options.prompts,
        **prompt,
        "slice_axis": slice_axis,
    })
    settings.provenance = provenance(bundle, settings, graphs, device)
    return settings


def graph_folder(engine: str, graphs: str | Path | None, bundle: Bundle) -> Path | None:
    """The folder of exported graphs ``engine`` runs: ``graphs``, else its default inside the
    bundle; ``None`` for the torch engine."""
    if engine not in GRAPH_FOLDERS:
        return None
    return Path(graphs) if graphs else bundle.root / GRAPH_FOLDERS[engine]


def graph_precisions(graphs: Path | None) -> dict[str, str] | None:
    """Each exported graph's precision as its manifest records it (fp32, fp16, int8 or bf16)."""
    manifest = Path(graphs) / MANIFEST_FILE if graphs is not None else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        spec = json.loads(manifest.read_text())
        return {g: e.get("precision", spec.get("precision", "fp32")) for g, e in spec["graphs"].items()}
    except (OSError, ValueError, KeyError, AttributeError):  # the engine names a broken manifest when it loads
        return None


def provenance(bundle: Bundle, settings: dict, graphs: Path | None, device: str) -> dict:
    """Which bundle, engine, graphs, device, precision, prompts, software and command made a run's
    masks, for ``run.json`` and the report; the settings that ``--resume`` compares are a part."""
    return {
        "bundle_name": bundle.name,
        "bundle": settings["bundle"],
        "bundle_sha256": settings["bundle_sha256"],
        "engine": settings["engine"],
        "graphs": str(Path(graphs).resolve()) if graphs is not None else None,
        "graphs_manifest_sha256": settings["graphs_manifest_sha256"],
        "device": str(device),
        "precision": settings["precision"],
        "graph_precisions": graph_precisions(graphs),
        "prompt": {"text": bundle.prompt.text,
                   **{k: settings[k] for k in ("prompts", *PromptSettings.__dataclass_fields__) if k in settings}},
        "cp_deploy_version": __version__,
        "torch_version": torch.__version__,
        "command": list(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def pipeline_settings(pipeline: CurriculumPipeline, slice_axis: int | None = None) -> RunSettings:
    """:func:`run_settings` of a pipeline built by hand (the Python API of ``run_folder``)."""
    engine = pipeline.engine
    name = ENGINE_NAMES.get(type(engine).__name__, type(engine).__name__)
    return run_settings(pipeline.bundle, name, getattr(engine, "folder", None), getattr(engine, "precision", "fp32"),
                        pipeline.options, slice_axis, str(pipeline.device))


def check_device(device: str, engine: str, count_gpus: bool = True) -> None:
    """Refuse a device torch would reject only after the models load; ``count_gpus`` is off where
    the GPUs are on other machines (Ray workers)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"--device {device}: not a device; pass cpu, cuda or cuda:N")
    if engine == "openvino" and device != "cpu":
        raise EngineError(OPENVINO_CPU_ONLY)
    if not count_gpus or (device == "cpu" and engine != "trt"):
        return
    n = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if n == 0:
        need = "--engine trt" if engine == "trt" else f"--device {device}"
        raise InputError(f"{need}: no CUDA GPU is visible to torch; pass --device cpu"
                         f"{' with --engine torch or onnxruntime' if engine == 'trt' else ''}, or run on a GPU machine")
    if index >= n:
        raise InputError(f"--device {device}: this machine has {n} CUDA GPU(s); pass cuda:0 to cuda:{n - 1}")


@dataclass(frozen=True)
class PipelineFactory:
    """A picklable recipe for a :class:`CurriculumPipeline`, so a remote worker loads the bundle
    itself instead of receiving a model over the wire."""

    bundle: str | None = None  # None: the bundle shipped with the package
    engine: str = "torch"
    device: str = "cpu"
    options: PipelineOptions = field(default_factory=PipelineOptions)
    threads: int = 0  # CPU threads of torch or ONNX Runtime; 0 leaves their default
    graphs: str | None = None  # exported graphs for onnxruntime/trt (default: inside the bundle)
    precision: str = "fp32"  # torch engine: autocast precision of the encoder
    compile: bool = False  # torch engine: torch.compile the encoder

    def settings(self, slice_axis: int | None = None, bundle: Bundle | None = None) -> RunSettings:
        """:func:`run_settings` of the pipeline this builds, without building it."""
        bundle = bundle or load_bundle(self.bundle)
        graphs = graph_folder(self.engine, self.graphs, bundle)
        return run_settings(bundle, self.engine, graphs, self.precision, self.options, slice_axis, self.device)

    def __call__(self, bundle: Bundle | None = None) -> CurriculumPipeline:
        """The pipeline; ``bundle``: this factory's bundle when the caller has loaded it already."""
        if self.threads:
            torch.set_num_threads(self.threads)
        return CurriculumPipeline.from_bundle(bundle or self.bundle, self.engine, self.device, graphs=self.graphs,
                                              threads=self.threads, precision=self.precision, compile=self.compile,
                                              **asdict(self.options))
