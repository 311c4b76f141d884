"""ONNX Runtime engine: the graphs ``cp-export onnx`` wrote, on the CPU or on CUDA.

On ``cuda`` it needs ``onnxruntime-gpu`` and binds torch's device tensors to the graphs' inputs
and outputs (IO binding), so embeddings and logits stay on the GPU between stages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.engines.graphs import DTYPES as _DTYPES
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS, OPENVINO_IR, resolve_shape
from cp_deploy.errors import EngineError


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise EngineError(
            "--engine onnxruntime needs ONNX Runtime: pip install 'curriculum-prompting[onnx]' "
            "(or '[gpu]' for onnxruntime-gpu)"
        ) from e
    return onnxruntime


class OnnxRuntimeEngine(GraphEngine):
    """Runs ``encoder``, ``detector``, ``keypoints``, ``box`` and ``refine`` graphs of one folder."""

    def __init__(self, bundle: Bundle, device: str = "cpu", onnx_dir: str | Path | None = None,
                 threads: int = 0) -> None:
        ort = import_onnxruntime()
        hint, paths = self.load_onnx_folder(bundle, onnx_dir)
        openvino_only = [g for g, spec in self.manifest["graphs"].items()
                         if spec.get("precision") == "bf16" or spec.get("format") == OPENVINO_IR]
        if openvino_only:
            # Those graphs passed their gate in OpenVINO's bf16 (run in fp32 here, the masks would
            # not be the ones the manifest vouches for) or are OpenVINO IR (NNCF's int8).
            raise EngineError(f"{self.folder}: {', '.join(openvino_only)} were exported to run on OpenVINO "
                              f"(cp-export onnx --precision bf16); use --engine openvino, or {hint}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError(
                    "--engine onnxruntime --device cuda needs onnxruntime-gpu (this onnxruntime has only "
                    f"{', '.join(ort.get_available_providers())}): pip install 'curriculum-prompting[gpu]', "
                    "or use --device cpu"
                )
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ONNX Runtime's intra-op threads spin after each call, taking the cores from the torch
        # work between graph calls: with 2 threads on 2 cores the pipeline ran at 1.085 images/s
        # without spinning against 0.915 with it (postprocess 2 ms against 23).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for name in GRAPHS:
            path = paths[name]
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
                raise EngineError(f"{path}: cannot load the ONNX graph ({str(e).splitlines()[0]}); {hint}") from e

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run one graph; inputs and outputs are torch tensors on :attr:`device`."""
        spec = self.manifest["graphs"][graph]
        if self.device.type != "cuda":
            return [torch.from_numpy(o) for o in self.sessions[graph].run(None, self.numpy_feeds(graph, feeds))]
        binding = self.sessions[graph].io_binding()
        dims: dict[str, int] = {}
        keep = []
        for t in spec["inputs"]:
            x = feeds[t.name].to(self.device, _DTYPES[t.dtype][1]).contiguous()
            keep.append(x)
            dims.update({d: x.shape[i] for i, d in enumerate(t.shape) if isinstance(d, str)})
            binding.bind_input(t.name, "cuda", self.device.index or 0, _DTYPES[t.dtype][0], tuple(x.shape),
                               x.data_ptr())
        outs = []
        for t in spec["outputs"]:
            y = torch.empty(resolve_shape(t, dims), dtype=_DTYPES[t.dtype][1], device=self.device)
            binding.bind_output(t.name, "cuda", self.device.index or 0, _DTYPES[t.dtype][0], tuple(y.shape),
                                y.data_ptr())
            outs.append(y)
        self.sessions[graph].run_with_iobinding(binding)
        return outs
