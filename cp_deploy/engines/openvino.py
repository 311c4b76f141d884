"""OpenVINO engine: the ONNX graphs ``cp-export onnx`` wrote, compiled by OpenVINO's CPU plugin.

It reads the same folder and ``manifest.json`` as the ONNX Runtime engine, with the same checks
(source weights, parity, file hashes); dynamic axes compile as dynamic dimensions. CPU only.

A graph the manifest marks ``bf16`` (``cp-export onnx --precision bf16``: fp32 files, gated in
bf16 on OpenVINO) compiles with the bf16 inference hint, and so does an int8 graph whose float
operations were gated in bf16 (``float_precision``: NNCF's OpenVINO IR, :mod:`export.nncf_int8`);
every other graph with f32. On a CPU without bf16 instructions the plugin runs it in f32;
:attr:`OpenVINOEngine.precisions` reads what each compiled graph really runs in.

Each graph is compiled once with its dynamic axes (the load checks it compiles, and it serves any
shape), then once more for each input shape it meets, up to :data:`SHAPES_PER_GRAPH`: the CPU
plugin runs a static shape faster (LiteMedSAM in bf16, one thread, ``tools.openvino_shapes``: the
encoder 559 ms against 649, the box decoder 33 against 40), and a batch job meets few shapes (one
per batch size, instance count and prompt form). With a compile cache, each reshaped graph is
saved there once as OpenVINO IR, so a later process compiles it from the cache without reading
and reshaping the ONNX file again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.constants import DEFAULT_CACHE_DIR
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS
from cp_deploy.errors import EngineError, MissingExtraError

# Compiled graphs, one folder per graph file's sha256 (the manifest's, checked against the file
# before compiling), so a re-exported graph never meets another's compiled blob.
COMPILE_CACHE = DEFAULT_CACHE_DIR / "openvino"
# Beyond this many shapes of one graph (a run with many instance counts), calls use the dynamic
# model rather than compile again.
SHAPES_PER_GRAPH = 8
_FIRST_CALL = threading.Lock()
_bindings_ready = False
CPU_ONLY = ("--engine openvino runs on the CPU only; pass --device cpu, or use --engine onnxruntime or trt "
            "for CUDA")


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise MissingExtraError.for_feature("--engine openvino", "openvino") from e
    return openvino


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile every time
        return False
    return os.access(folder, os.W_OK)


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (AVX512-BF16 or AMX); without, a bf16 hint runs in f32."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOEngine(GraphEngine):
    """Runs ``encoder``, ``detector``, ``keypoints``, ``box`` and ``refine`` graphs of one ONNX folder."""

    def __init__(self, bundle: Bundle, device: str = "cpu", onnx_dir: str | Path | None = None,
                 threads: int = 0, cache: Path | None = COMPILE_CACHE) -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise EngineError(CPU_ONLY)
        ov = import_openvino()
        hint, paths = self.load_onnx_folder(bundle, onnx_dir)
        core = ov.Core()
        config = {}
        if threads:
            # Pinning puts every compiled model's threads on the first cores: two one-thread model
            # workers then share one core (measured: 0.82 against 1.72 encoder passes/s on 2 cores).
            config.update(INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False)
        self._ov, self._core, self._paths, self._options = ov, core, paths, {}
        self.models, self.requests, self.outputs = {}, {}, {}
        self._sources: dict[str, object] = {}  # ov.Model of each graph, read on its first static compile
        self._static: dict[tuple, object] = {}  # (graph, input shapes) -> infer request
        for name in GRAPHS:
            # The hint is always set: on CPUs with AVX512-BF16 or AMX the plugin otherwise picks bf16
            # by itself, for graphs the gate never saw in bf16.
            spec = self.manifest["graphs"][name]
            bf16 = spec.get("precision") == "bf16" or spec.get("float_precision") == "bf16"
            options = {**config, "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
            blobs = cache / spec["sha256"][:16] if cache is not None else None
            if blobs is not None and _writable(blobs):
                # The default bundle's five graphs load from it in 0.55 s, against 3.4 s compiling.
                options["CACHE_DIR"] = str(blobs)
            self._options[name] = options
            try:
                model = core.compile_model(str(paths[name]), "CPU", options)
            except Exception as e:  # OpenVINO raises RuntimeError (or its own types) for graphs it cannot read
                raise EngineError(f"{paths[name]}: cannot compile the graph with OpenVINO "
                                  f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}); {hint}") from e
            self.models[name] = model
            self.requests[name] = model.create_infer_request()
            self.outputs[name] = [t.name for t in spec["outputs"]]

    def request_for(self, graph: str, feeds: dict):
        """The infer request compiled for these inputs' shapes (see the module's docstring)."""
        key = (graph, tuple(a.shape for a in feeds.values()))
        request = self._static.get(key)
        if request is not None:
            return request
        empty = any(0 in shape for shape in key[1])  # no static compile of a zero-size input
        if empty or sum(g == graph for g, _ in self._static) >= SHAPES_PER_GRAPH:
            return self.requests[graph]
        shapes = {name: list(a.shape) for name, a in feeds.items()}
        try:
            compiled = self._core.compile_model(self._static_model(graph, shapes), "CPU", self._options[graph])
        except RuntimeError:
            # The plugin's int8 passes can fail on a shape the dynamic model runs (seen: a QDQ
            # box decoder with 7 tokens); this shape then stays on the dynamic model.
            request = self.requests[graph]
        else:
            request = compiled.create_infer_request()
        self._static[key] = request
        return request

    def _static_model(self, graph: str, shapes: dict[str, list[int]]):
        """``graph`` with these input shapes: an IR file in the compile cache (written on first
        use, the ``.bin`` before the ``.xml`` it belongs to, so a reader finding the ``.xml``
        finds both), or an in-memory model without a cache."""
        folder = self._options[graph].get("CACHE_DIR")
        xml = None
        if folder is not None:
            tag = hashlib.sha256(repr(sorted(shapes.items())).encode()).hexdigest()[:16]
            xml = Path(folder) / f"static-{tag}.xml"
            if xml.is_file():
                return str(xml)
        if graph not in self._sources:
            self._sources[graph] = self._core.read_model(str(self._paths[graph]))
        model = self._sources[graph].clone()
        model.reshape(shapes)
        if xml is None:
            return model
        tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.{threading.get_ident()}.xml")
        try:
            self._ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        except (OSError, RuntimeError):  # a full or read-only cache: this process compiles it from memory
            for f in (tmp, tmp.with_suffix(".bin")):
                f.unlink(missing_ok=True)
            return model
        return str(xml)

    @property
    def precisions(self) -> dict[str, str]:
        """Each graph's precision as compiled: the manifest's, with ``bf16`` read back from the
        plugin (``f32`` where the CPU has no bf16 instructions)."""
        out = {}
        for name, model in self.models.items():
            declared = self.manifest["graphs"][name].get("precision", "fp32")
            if declared == "bf16" and model.get_property("INFERENCE_PRECISION_HINT").get_type_name() != "bf16":
                declared = "fp32"
            out[name] = declared
        return out

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run one graph; outputs in the manifest's order, as CPU tensors the engine no longer holds."""
        global _bindings_ready
        if not _bindings_ready:
            # The bindings set up their numpy bridge on first use; two model workers doing so at
            # once deadlock (one holds the GIL and waits on a C++ static guard, the other holds
            # the guard and waits on the GIL: seen in a cp-bench --end-to-end run). The first
            # call in the process runs alone.
            with _FIRST_CALL:
                out = self._run(graph, feeds)
                _bindings_ready = True
            return out
        return self._run(graph, feeds)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = self.numpy_feeds(graph, feeds)
        request = self.request_for(graph, arrays)
        request.infer(arrays)
        return [torch.from_numpy(request.get_tensor(name).data.copy()) for name in self.outputs[graph]]
