"""Parity of an exported engine against the torch engine: per-graph logits and final masks.

Three checks, all run by ``cp-export`` after every export:
* **random**: each graph on random inputs of valid shape (batch and instance counts other than
  the ones traced), max abs difference of every output;
* **real**: the torch pipeline runs on real images while every engine call is recorded; each
  call is replayed through the exported engine (so the prompt conversion is covered too);
* **masks**: both pipelines end to end on the same images; the final binary masks are compared
  pixel by pixel and by Dice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cp_deploy.bundle import Bundle
from cp_deploy.engines.base import Engine
from cp_deploy.metrics import dice
from cp_deploy.models.build import Models
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from export.onnx import graph_modules


@dataclass
class Tolerance:
    """Max abs logit difference allowed, relative to the output's scale (``rel * max(1, max|ref|)``),
    and the final-mask agreement required (per image: pixels equal, Dice)."""

    rel: float = 1e-3
    pixel_agreement: float = 0.999
    dice: float = 0.99
    # Graphs whose logits are not bounded (int8 and bf16 ones): their differences are reported, and
    # only the final masks judge them.
    unbounded: tuple[str, ...] = ()

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        """fp32 graphs agree with torch to rounding; fp16 ones to about 1e-2 of the logits' scale
        (measured on the default bundle: 2e-3), so a few pixels on mask borders may flip."""
        return cls() if precision == "fp32" else cls(rel=2e-2, pixel_agreement=0.995, dice=0.98)

    @classmethod
    def for_manifest(cls, manifest: dict) -> Tolerance:
        """The tolerance of an exported folder: by its precision, and where some graphs are int8 or
        bf16, the gate's per-image Dice (0.98) with those graphs' logits unbounded (quantisation
        and bf16 move them by far more than 1e-3; the other graphs keep their bound)."""
        reduced = tuple(g for g, spec in manifest.get("graphs", {}).items()
                        if spec.get("precision") in ("int8", "bf16"))
        if not reduced:
            return cls.for_precision("fp16" if manifest.get("precision") == "fp16" else "fp32")
        return cls(pixel_agreement=0.98, dice=0.98, unbounded=reduced)


@dataclass
class ParityReport:
    graphs: dict[str, dict[str, float]] = field(default_factory=dict)  # graph -> check -> max abs diff
    scale: dict[str, float] = field(default_factory=dict)  # graph -> max |reference output|
    masks: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"passed": not self.failures, "graphs": self.graphs, "scale": self.scale, "masks": self.masks,
                "failures": self.failures}

    def table(self) -> str:
        rows = [f"{'graph':<10} {'random':>11} {'real':>11} {'max |ref|':>10}"]
        for g, d in self.graphs.items():
            rows.append(f"{g:<10} {d.get('random', float('nan')):>11.3e} {d.get('real', float('nan')):>11.3e} "
                        f"{self.scale.get(g, float('nan')):>10.3g}")
        if self.masks:
            m = self.masks
            rows.append(f"final masks, {m['images']} images: pixels equal {100 * m['pixel_agreement_mean']:.4f}% "
                        f"(min {100 * m['pixel_agreement_min']:.4f}%), Dice {m['dice_mean']:.5f} "
                        f"(min {m['dice_min']:.5f})")
        return "\n".join(rows)


class RecordingEngine:
    """Passes calls through to ``engine`` and keeps (method, args, kwargs, outputs) of each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.device = engine.device
        self.calls: list[tuple[str, tuple, dict, object]] = []

    def _call(self, method: str, *args, **kwargs):
        out = getattr(self.engine, method)(*args, **kwargs)
        self.calls.append((method, args, kwargs, out))
        return out

    def encode(self, images):
        return self._call("encode", images)

    def detect(self, inputs):
        return self._call("detect", inputs)

    def keypoints(self, features, rois):
        return self._call("keypoints", features, rois)

    def join(self):
        self.engine.join()

    def decode(self, head, embeddings, points=None, boxes=None, mask_input=None):
        return self._call("decode", head, embeddings, points=points, boxes=boxes, mask_input=mask_input)


_GRAPH_OF = {"encode": "encoder", "detect": "detector", "keypoints": "keypoints"}


def _outputs(x) -> list[torch.Tensor]:
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _max_diff(a, b) -> tuple[float, float]:
    ref, got = _outputs(a), _outputs(b)
    diff = max(float((r.float().cpu() - g.float().cpu()).abs().max()) if r.numel() else 0.0 for r, g in zip(ref, got))
    scale = max(float(r.float().abs().max()) if r.numel() else 0.0 for r in ref)
    return diff, scale


def check_parity(
    bundle: Bundle,
    models: Models,
    torch_engine: Engine,
    engine: Engine,
    images: list[np.ndarray],
    tol: Tolerance | None = None,
    random_inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    run_graph=None,
    progress: bool | None = None,
) -> ParityReport:
    """Compare ``engine`` with ``torch_engine`` (see the module docstring). ``run_graph(name,
    feeds)`` runs one exported graph on random ``random_inputs`` (both optional). ``progress``: a
    bar over the checks on stderr (``None``: when stderr is a terminal), as they take minutes for
    a large encoder on a CPU."""
    tol = tol or Tolerance()
    rep = ParityReport()
    randoms = len(random_inputs) if random_inputs is not None and run_graph is not None else 0
    # Random graphs, the recorded torch run, its replayed calls (counted once recorded), the engine's run.
    bar = tqdm(total=randoms + 2, desc="parity", unit="check", leave=False, file=sys.stderr,
               disable=not (sys.stderr.isatty() if progress is None else progress))

    def note(graph: str, check: str, diff: float, scale: float) -> None:
        d = rep.graphs.setdefault(graph, {})
        d[check] = max(d.get(check, 0.0), diff)
        rep.scale[graph] = max(rep.scale.get(graph, 0.0), scale)

    if random_inputs is not None and run_graph is not None:
        modules = graph_modules(bundle, models)  # the fp32 reference, whatever the engine's precision
        for graph, feeds in random_inputs.items():
            dev = next(modules[graph].parameters()).device
            with torch.no_grad():
                ref = modules[graph](*(v.to(dev) for v in feeds.values()))
            note(graph, "random", *_max_diff(ref, run_graph(graph, feeds)))
            bar.update(1)

    recorder = RecordingEngine(torch_engine)
    options = PipelineOptions(prompts="curriculum")
    ref_results = CurriculumPipeline(bundle, recorder, options).predict(images)
    bar.total += len(recorder.calls)
    bar.update(1)
    for method, args, kwargs, out in recorder.calls:
        graph = args[0] if method == "decode" else _GRAPH_OF[method]
        note(graph, "real", *_max_diff(out, getattr(engine, method)(*args, **kwargs)))
        bar.update(1)
    got_results = CurriculumPipeline(bundle, engine, options).predict(images)
    bar.update(1)
    bar.close()

    agree = [float((r.mask == g.mask).mean()) for r, g in zip(ref_results, got_results)]
    dices = [dice(g.mask, r.mask) for r, g in zip(ref_results, got_results)]
    rep.masks = {"images": len(images), "pixel_agreement_mean": float(np.mean(agree)),
                 "pixel_agreement_min": float(np.min(agree)), "dice_mean": float(np.mean(dices)),
                 "dice_min": float(np.min(dices)),
                 "instances_torch": int(sum(len(r.boxes) for r in ref_results)),
                 "instances_engine": int(sum(len(g.boxes) for g in got_results))}

    for graph, d in rep.graphs.items():
        limit = float("inf") if graph in tol.unbounded else tol.rel * max(1.0, rep.scale[graph])
        for check, diff in d.items():
            if not diff <= limit:  # also catches NaN
                rep.failures.append(f"{graph} ({check} inputs): max abs diff {diff:.3e} > {limit:.3e}")
    if rep.masks["instances_torch"] != rep.masks["instances_engine"]:
        rep.failures.append(f"instances differ: torch {rep.masks['instances_torch']}, "
                            f"engine {rep.masks['instances_engine']}")
    if rep.masks["pixel_agreement_min"] < tol.pixel_agreement:
        rep.failures.append(f"final masks: {100 * rep.masks['pixel_agreement_min']:.3f}% pixels equal "
                            f"< {100 * tol.pixel_agreement:.3f}%")
    if rep.masks["dice_min"] < tol.dice:
        rep.failures.append(f"final masks: Dice {rep.masks['dice_min']:.4f} < {tol.dice}")
    return rep


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded RGB images with a bright blob on a textured background, of assorted sizes."""
    import cv2

    rng = np.random.default_rng(seed)
    sizes = ((240, 320), (301, 257), (256, 256), (180, 420))
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = rng.integers(20, 90, (h, w, 3)).astype(np.uint8)
        cx, cy = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))
        cv2.ellipse(img, (cx, cy), (int(w * 0.15), int(h * 0.12)), float(rng.integers(0, 180)), 0, 360,
                    tuple(int(v) for v in rng.integers(130, 255, 3)), -1)
        out.append(cv2.GaussianBlur(img, (7, 7), 0))
    return out
