"""TensorRT engine: the serialized engines ``cp-export trt`` built, on one CUDA stream.

Device memory is torch's: inputs are bound by address, and output tensors are allocated once per
shape and reused. Each graph has its own execution context; all run on one side stream that
waits on the caller's stream (and the caller's stream on it), so no ``synchronize`` is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cp_deploy.bundle import Bundle
from cp_deploy.engines.graphs import GraphEngine
from cp_deploy.engines.manifest import GRAPHS, load_graph_folder, resolve_shape
from cp_deploy.errors import EngineError

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class TensorRTEngine(GraphEngine):
    def __init__(self, bundle: Bundle, device: str = "cuda", engine_dir: str | Path | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise EngineError("--engine trt needs TensorRT: pip install 'curriculum-prompting[trt]'") from e
        if not torch.cuda.is_available():
            raise EngineError("--engine trt needs a CUDA GPU, and torch sees none; use --engine onnxruntime or torch")
        self.folder = Path(engine_dir) if engine_dir is not None else bundle.root / "trt"
        hint = (f"rebuild them with: cp-export trt --onnx {bundle.root / 'onnx'} --out {self.folder} "
                "(after cp-export onnx if needed)")
        self.manifest, paths = load_graph_folder(self.folder, bundle, hint)
        m = self.manifest
        self.device = torch.device(device)
        gpu = torch.cuda.get_device_name(self.device)
        if m.get("tensorrt") != trt.__version__ or m.get("gpu") != gpu:
            raise EngineError(
                f"{self.folder / 'manifest.json'}: engines were built with TensorRT {m.get('tensorrt')} on "
                f"'{m.get('gpu')}', but this is TensorRT {trt.__version__} on '{gpu}'; {hint}"
            )
        self.max_dims = m["max_dims"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name in GRAPHS:
            path = paths[name]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"{path}: not a valid TensorRT engine for this TensorRT/GPU; {hint}")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self._outputs: dict[tuple, torch.Tensor] = {}
        self.mask_size = tuple(m["graphs"]["box"]["inputs"][3].shape[-2:])

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        spec = self.manifest["graphs"][graph]
        ctx = self.contexts[graph]
        dims: dict[str, int] = {}
        inputs = []
        for t in spec["inputs"]:
            x = feeds[t.name].to(self.device, _DTYPES[t.dtype]).contiguous()
            for i, d in enumerate(t.shape):
                if isinstance(d, str):
                    if x.shape[i] > self.max_dims[d]:
                        raise EngineError(
                            f"{self.folder / spec['file']}: {x.shape[i]} {d} exceed the engine's profile "
                            f"(at most {self.max_dims[d]}); lower --batch-size or rebuild with "
                            f"cp-export trt --max-{'batch' if d == 'batch' else d}"
                        )
                    dims[d] = x.shape[i]
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
            inputs.append(x)
        outs = []
        for t in spec["outputs"]:
            shape = resolve_shape(t, dims)
            key = (graph, t.name, shape)
            if key not in self._outputs:
                self._outputs[key] = torch.empty(shape, dtype=_DTYPES[t.dtype], device=self.device)
            y = self._outputs[key]
            ctx.set_tensor_address(t.name, y.data_ptr())
            outs.append(y)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.folder / spec['file']}: TensorRT execution failed")
        caller.wait_stream(self.stream)
        for x in inputs:  # keep the inputs alive until the side stream has read them
            x.record_stream(self.stream)
        # Reused buffers would be overwritten by the next call with the same shape: hand out copies.
        return [y.clone() for y in outs]
