"""``cp-deploy report``: one self-contained HTML page about a run.

Counts, failures, throughput, a per-stage timing chart and a gallery of the run's overlays (box,
edge points, coarse and final contour), all embedded, so the file can be mailed or archived on
its own. With ground truth, Dice per image (``metrics.dice`` through ``evaluate_dirs``) and the
gallery ordered worst first. The page has no scripts and loads nothing from the network.

Nothing in it comes from DICOM headers except what ``results.jsonl`` holds, which never has names,
IDs or dates.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path

import numpy as np

from cp_deploy.io import RESULTS_FILE, RunJournal, atomic_write_bytes

RUN_FILE = "run.json"
STAGE_ORDER = ("decode", "preprocess", "encode", "detect", "box", "keypoints", "refine", "postprocess", "write")

def _legend() -> list[tuple[str, str]]:
    """The overlay colours, from the module that draws them."""
    from cp_deploy.visualize import BOX, COARSE, FINAL, POINT

    hexa = "#{:02x}{:02x}{:02x}".format
    return [(hexa(*FINAL), "final contour"), (hexa(*COARSE), "coarse contour"), (hexa(*BOX), "box and score"),
            (hexa(*POINT), "edge points")]


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d232a;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px}
.muted{color:#5b6672;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px} .card span{font-size:12px;color:#5b6672}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #dde2e8;padding:4px 8px;text-align:left;vertical-align:top}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #dde2e8;border-radius:8px;overflow:hidden}
figure img{width:100%;display:block;background:#000}
figcaption{padding:6px 8px;font-size:12px;word-break:break-all}
.bad{color:#b00020;font-weight:600} .key{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;
vertical-align:middle;border:1px solid #555}
"""


def load_records(run_dir: str | Path) -> list[dict]:
    """The run's records: ``results.jsonl``, or what the journal of an unfinished run holds."""
    journal = RunJournal(run_dir)
    journal.load()
    if not journal.records:
        raise FileNotFoundError(
            f"{Path(run_dir) / RESULTS_FILE} not found; run cp-deploy batch --output {run_dir} first"
        )
    return [journal.records[p] for p in sorted(journal.records)]


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def stage_means(records: list[dict]) -> dict[str, float]:
    """Mean milliseconds per stage over the segmented images, in pipeline order."""
    sums: dict[str, list[float]] = {}
    for r in records:
        for k, v in r.get("timings_ms", {}).items():
            sums.setdefault(k, []).append(float(v))
    order = [s for s in STAGE_ORDER if s in sums] + sorted(set(sums) - set(STAGE_ORDER))
    return {s: float(np.mean(sums[s])) for s in order}


def _timing_svg(means: dict[str, float]) -> str:
    if not means:
        return '<p class="muted">no timings recorded</p>'
    bar_w, row_h, label_w = 420, 22, 100
    top = max(means.values()) or 1.0
    rows = []
    for i, (stage, ms) in enumerate(means.items()):
        y = i * row_h
        w = max(1.0, bar_w * ms / top)
        rows.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(stage)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="#3b7dd8"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">{ms:.1f} ms</text>'
        )
    h = row_h * len(means)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{h}" '
            f'role="img" aria-label="mean milliseconds per stage">{"".join(rows)}</svg>')


def _gt_dice(run_dir: Path, gt_dir: str | Path, images: list[dict]) -> dict[str, float]:
    """Record path -> Dice against the ground-truth mask of the same relative name."""
    from cp_deploy.metrics import evaluate_dirs

    rows = {r["image"]: r["dice"] for r in evaluate_dirs(run_dir, gt_dir)["rows"]}
    out = {}
    for r in images:
        key = r["mask"][len("masks/"):-len(".png")] if "mask" in r else None
        if key in rows:
            out[r["path"]] = rows[key]
    return out


def build_report(run_dir: str | Path, gt_dir: str | Path | None = None, max_gallery: int = 200,
                 link_base: str | Path | None = None) -> str:
    """The report's HTML for ``run_dir`` (see the module docstring); links to output files are
    relative to ``link_base``, the report's folder (default: ``run_dir``)."""
    run_dir = Path(run_dir)
    link_base = Path(link_base) if link_base is not None else run_dir
    records = load_records(run_dir)
    # A multi-frame file has its own record besides its frames' (``frames`` says how many).
    files = [r for r in records if "frames" in r]
    images = [r for r in records if "frames" not in r]
    ok = [r for r in images if r.get("status") == "ok"]
    failures = [r for r in records if r.get("status") != "ok"]
    run_info = {}
    if (run_dir / RUN_FILE).is_file():
        run_info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    means = stage_means(ok)
    pipeline_ms = sum(means.values())
    dice = _gt_dice(run_dir, gt_dir, ok) if gt_dir is not None else {}

    cards = [("images", len(images)), ("segmented", len(ok)), ("failed", len(images) - len(ok))]
    if files:
        cards.append(("multi-frame files", len(files)))
    if run_info.get("images_per_second"):
        cards.append(("images/s (last run, wall clock)", f"{run_info['images_per_second']:.2f}"))
    if pipeline_ms:
        cards.append(("images/s (sum of stage times)", f"{1000.0 / pipeline_ms:.2f}"))
    if dice:
        cards.append(("mean Dice", f"{np.mean(list(dice.values())):.4f}"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>cp-deploy report: {html.escape(run_dir.name)}</title>",
        '<link rel="icon" href="data:,">',
        f"<style>{CSS}</style></head><body>",
        f"<h1>cp-deploy run report: {html.escape(run_dir.name)}</h1>",
        f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
        f'{" with ground truth" if dice else ""}</p>',
        '<div class="cards">',
        *(f'<div class="card"><b>{html.escape(str(v))}</b><span>{html.escape(k)}</span></div>' for k, v in cards),
        "</div>",
        "<h2>Time per image and stage (mean over segmented images)</h2>",
        _timing_svg(means),
    ]
    if failures:
        parts += ["<h2>Failures</h2>", "<table><tr><th>input</th><th>error</th></tr>"]
        parts += [f'<tr><td>{html.escape(r["path"])}</td><td class="bad">{html.escape(str(r.get("error", "")))}</td>'
                  "</tr>" for r in failures]
        parts.append("</table>")
    with_outputs = [r for r in records if r.get("outputs") or "dicom_seg" in r]
    if with_outputs:
        parts += ["<h2>Format outputs</h2>", "<table><tr><th>input</th><th>frames</th><th>outputs</th></tr>"]
        for r in with_outputs:
            outs = [f'{html.escape(k)}: <a href="{html.escape(os.path.relpath(run_dir / v, link_base))}">'
                    f"{html.escape(v)}</a>" for k, v in r.get("outputs", {}).items()]
            if "dicom_seg" in r:
                outs.append(f"DICOM-SEG {html.escape(r['dicom_seg'])}")
            parts.append(f'<tr><td>{html.escape(r["path"])}</td><td>{r.get("frames", 1)}</td>'
                         f'<td>{"<br>".join(outs)}</td></tr>')
        parts.append("</table>")

    gallery = sorted(ok, key=lambda r: (dice.get(r["path"], 2.0), r["path"])) if dice else ok
    shown = gallery[:max_gallery]
    parts.append(f"<h2>Gallery{' (worst Dice first)' if dice else ''}</h2>")
    parts.append('<p class="muted">' + "".join(f'<span class="key" style="background:{c}"></span>{html.escape(t)}'
                                             for c, t in _legend()) + "</p>")
    if len(gallery) > len(shown):
        parts.append(f'<p class="muted">showing {len(shown)} of {len(gallery)} images (--max-images)</p>')
    if shown and not any("overlay" in r for r in shown):
        parts.append('<p class="muted">this run wrote no overlays, so the gallery shows masks; '
                     "rerun cp-deploy batch with --overlays to see boxes, points and contours</p>")
    parts.append('<div class="gallery">')
    for r in shown:
        uri = _data_uri(run_dir / r["overlay"]) if "overlay" in r else None
        uri = uri or _data_uri(run_dir / r["mask"])
        caption = [html.escape(r["path"]), f'{len(r.get("instances", []))} instance(s), '
                   f'area {r.get("mask_area", 0)} px, {r.get("width")}x{r.get("height")}']
        if r["path"] in dice:
            caption.append(f'Dice <b>{dice[r["path"]]:.4f}</b>')
        img = f'<img src="{uri}" alt="{html.escape(r["path"])}">' if uri else '<p class="bad">image missing</p>'
        parts.append(f'<figure>{img}<figcaption>{"<br>".join(caption)}</figcaption></figure>')
    parts += ["</div>", "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir: str | Path, gt_dir: str | Path | None = None, output: str | Path | None = None,
                 max_gallery: int = 200) -> Path:
    """Write ``report.html`` (or ``output``) for ``run_dir``; returns its path."""
    path = Path(output) if output is not None else Path(run_dir) / "report.html"
    atomic_write_bytes(path, build_report(run_dir, gt_dir, max_gallery, path.parent).encode("utf-8"))
    return path
