"""Executors drive the pipeline over a folder: the local one streams through threads, the Ray one
through a Ray Data actor pool. Both build the pipeline with :class:`PipelineFactory`."""

from __future__ import annotations

from dataclasses import dataclass, field

from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions


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

    def __call__(self) -> CurriculumPipeline:
        import torch

        from cp_deploy.bundle import load_bundle
        from cp_deploy.engines import create_engine

        if self.threads:
            torch.set_num_threads(self.threads)
        bundle = load_bundle(self.bundle)
        engine = create_engine(self.engine, bundle, device=self.device, graphs=self.graphs, threads=self.threads,
                               precision=self.precision, compile=self.compile)
        return CurriculumPipeline(bundle, engine, self.options)
