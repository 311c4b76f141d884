"""``cp-deploy report``: one self-contained HTML page about a run.

Counts, failures, throughput, what made the masks (bundle and its hash, engine, device, precision,
prompts, versions, command: ``run.json``'s provenance), a per-stage timing chart and a gallery of
the run's overlays (box, edge points, coarse and final contour), all embedded, so the file can be
mailed or archived on its own. With ground truth, Dice and IoU per image (``evaluate_dirs``), the
ground-truth contour drawn on each picture and the gallery ordered worst first. The page has no
scripts and loads nothing from the network.

Nothing in it comes from DICOM headers except what ``results.jsonl`` holds, which never has names,
IDs or dates. ``results.jsonl`` is treated as untrusted: every field is escaped, only files inside
the run folder are embedded or linked (a record's ``mask`` of ``../../etc/passwd`` is refused and
listed), and lines that are not records are listed rather than failing the report.
"""

from __future__ import annotations

import base64
import html
import os
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cp_deploy.errors import InputError
from cp_deploy.executors.output import read_run_info
from cp_deploy.files import atomic_write_bytes, read_mask
from cp_deploy.journal import RESULTS_FILE, RunJournal
from cp_deploy.metrics import evaluate_dirs
from cp_deploy.visualize import BOX, COARSE, FINAL, GROUND_TRUTH, POINT, draw_ground_truth

STAGE_ORDER = ("decode", "preprocess", "encode", "detect", "box", "keypoints", "refine", "postprocess", "write")


def _legend(gt: bool = False) -> list[tuple[str, str]]:
    """The overlay colours, from the module that draws them."""
    hexa = "#{:02x}{:02x}{:02x}".format
    return [(hexa(*FINAL), "final contour"), (hexa(*COARSE), "coarse contour"), (hexa(*BOX), "box and score"),
            (hexa(*POINT), "edge points"), *([(hexa(*GROUND_TRUTH), "ground-truth contour")] if gt else [])]


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


def load_records(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The run's records (``results.jsonl``, or what the journal of an unfinished run holds) and
    a message for each line that is not a record (``RunJournal.bad_lines``)."""
    journal = RunJournal(run_dir)
    journal.load()
    if not journal.records and not journal.bad_lines:
        raise InputError(
            f"{Path(run_dir) / RESULTS_FILE} not found; run cp-deploy batch --output {run_dir} first"
        )
    return list(journal.full_records()), list(journal.bad_lines)


def run_file(run_dir: Path, name: object) -> Path | None:
    """The file a record names (``mask``, ``overlay``, an output), or ``None`` unless it is a
    relative path that stays inside ``run_dir`` once symlinks and ``..`` are resolved: a report
    embeds what it names, so a crafted record must not pull in other files of the machine."""
    if not isinstance(name, str) or not name:
        return None
    try:
        path = (run_dir / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if path.is_relative_to(run_dir.resolve()) else None


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def stage_means(records: list[dict]) -> dict[str, float]:
    """Mean milliseconds per stage over the segmented images, in pipeline order."""
    sums: dict[str, list[float]] = {}
    for r in records:
        timings = r.get("timings_ms")
        for k, v in (timings.items() if isinstance(timings, dict) else ()):
            if isinstance(v, int | float) and not isinstance(v, bool):
                sums.setdefault(str(k), []).append(float(v))
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


def _gt_scores(run_dir: Path, gt_dir: str | Path, images: list[dict]) -> dict[str, dict]:
    """Record path -> its Dice, IoU and ground-truth mask file (the mask of the same relative name)."""
    gt_dir = Path(gt_dir)
    rows = {r["image"]: r for r in evaluate_dirs(run_dir, gt_dir)["rows"]}
    out = {}
    for r in images:
        mask = r.get("mask")
        key = mask[len("masks/"):-len(".png")] if isinstance(mask, str) else None
        if key in rows:
            out[r["path"]] = {"dice": rows[key]["dice"], "iou": rows[key]["iou"], "gt": gt_dir / rows[key]["gt"]}
    return out


def _provenance_table(run_info: dict) -> str:
    """What made the masks (``run.json``'s provenance), one escaped row per item."""
    prov = run_info.get("provenance")
    if not isinstance(prov, dict):
        return '<p class="muted">run.json records no provenance (a run of an older cp-deploy, or none yet)</p>'
    prompt = prov.get("prompt")
    command = prov.get("command")
    rows = [
        ("bundle", f"{prov.get('bundle_name')} ({prov.get('bundle')})"),
        ("bundle.json sha256", prov.get("bundle_sha256")),
        ("engine", prov.get("engine")),
        ("graphs", f"{prov.get('graphs')} (manifest.json sha256 {prov.get('graphs_manifest_sha256')})"
         if prov.get("graphs") else "none (the torch engine)"),
        ("device", prov.get("device")),
        ("precision", prov.get("precision") or "the graphs' own"),
        ("prompts", ", ".join(f"{k} {v}" for k, v in prompt.items()) if isinstance(prompt, dict) else prompt),
        ("cp-deploy", prov.get("cp_deploy_version")),
        ("torch", prov.get("torch_version")),
        ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
        ("started", f"{prov.get('started')}{' (resumed an earlier run)' if prov.get('resumed') else ''}"),
    ]
    return ("<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
            + "</table>")


def _esc(value: object) -> str:
    return html.escape(str(value))


def _with_ground_truth(path: Path, gt: Path) -> str | None:
    """``path`` (an overlay or a mask) with ``gt``'s contour drawn on it, as a data URI."""
    picture = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    if picture is None:
        return None
    drawn = draw_ground_truth(picture[..., ::-1], read_mask(gt))[..., ::-1]
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    ok, data = cv2.imencode(".jpg" if jpeg else ".png", drawn, [cv2.IMWRITE_JPEG_QUALITY, 90] if jpeg else [])
    if not ok:
        return None
    return f"data:image/{'jpeg' if jpeg else 'png'};base64,{base64.b64encode(data.tobytes()).decode('ascii')}"


def _gallery_image(run_dir: Path, r: dict, problems: list[str], gt: Path | None = None) -> str:
    """The figure's image: the overlay, else the mask, embedded, with the contour of the
    ground-truth mask ``gt`` where given; refused names are not read."""
    for key in ("overlay", "mask"):
        if key not in r:
            continue
        path = run_file(run_dir, r[key])
        if path is None:
            problems.append(f"record {r['path']!r}: {key} {r[key]!r} is not a file inside the run folder; "
                            "not embedded")
            return f'<p class="bad">refused: {_esc(key)} path {_esc(r[key])} lies outside the run folder</p>'
        uri = (_with_ground_truth(path, gt) if gt is not None and path.is_file() else None) or _data_uri(path)
        if uri:
            return f'<img src="{uri}" alt="{_esc(r["path"])}">'
    return '<p class="bad">image missing</p>'


def build_report(run_dir: str | Path, gt_dir: str | Path | None = None, max_gallery: int = 200,
                 link_base: str | Path | None = None, problems: list[str] | None = None) -> str:
    """The report's HTML for ``run_dir`` (see the module docstring); links to output files are
    relative to ``link_base``, the report's folder (default: ``run_dir``). Lines that are not
    records and refused file names are listed in the page and appended to ``problems``."""
    run_dir = Path(run_dir)
    link_base = Path(link_base) if link_base is not None else run_dir
    records, bad_lines = load_records(run_dir)
    problems = problems if problems is not None else []
    problems += bad_lines
    # A multi-frame file has its own record besides its frames' (``frames`` says how many).
    files = [r for r in records if "frames" in r]
    images = [r for r in records if "frames" not in r]
    ok = [r for r in images if r.get("status") == "ok"]
    failures = [r for r in records if r.get("status") != "ok"]
    run_info = read_run_info(run_dir, problems)
    means = stage_means(ok)
    pipeline_ms = sum(means.values())
    scores = _gt_scores(run_dir, gt_dir, ok) if gt_dir is not None else {}
    dice = {k: v["dice"] for k, v in scores.items()}

    cards = [("images", len(images)), ("segmented", len(ok)), ("failed", len(images) - len(ok))]
    if files:
        cards.append(("multi-frame files", len(files)))
    if isinstance(run_info.get("images_per_second"), int | float) and run_info["images_per_second"]:
        cards.append(("images/s (last run, wall clock)", f"{run_info['images_per_second']:.2f}"))
    if pipeline_ms:
        cards.append(("images/s (sum of stage times)", f"{1000.0 / pipeline_ms:.2f}"))
    if dice:
        cards.append(("mean Dice", f"{np.mean(list(dice.values())):.4f}"))
        cards.append(("mean IoU", f"{np.mean([v['iou'] for v in scores.values()]):.4f}"))
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
        "<h2>What made these masks</h2>",
        _provenance_table(run_info),
        "<h2>Time per image and stage (mean over segmented images)</h2>",
        _timing_svg(means),
    ]
    if failures:
        parts += ["<h2>Failures</h2>", "<table><tr><th>input</th><th>error</th></tr>"]
        parts += [f'<tr><td>{_esc(r["path"])}</td><td class="bad">{_esc(r.get("error", ""))}</td>'
                  "</tr>" for r in failures]
        parts.append("</table>")
    with_outputs = [r for r in records if r.get("outputs") or "dicom_seg" in r]
    if with_outputs:
        parts += ["<h2>Format outputs</h2>", "<table><tr><th>input</th><th>frames</th><th>outputs</th></tr>"]
        for r in with_outputs:
            outputs = r.get("outputs")
            outs = []
            for k, v in (outputs.items() if isinstance(outputs, dict) else ()):
                target = run_file(run_dir, v)
                if target is None:
                    problems.append(f"record {r['path']!r}: output {v!r} is not a file inside the run folder; "
                                    "not linked")
                    outs.append(f'{_esc(k)}: <span class="bad">refused: {_esc(v)} lies outside the run folder</span>')
                else:
                    outs.append(f'{_esc(k)}: <a href="{_esc(os.path.relpath(target, link_base.resolve()))}">'
                                f"{_esc(v)}</a>")
            if "dicom_seg" in r:
                outs.append(f"DICOM-SEG {_esc(r['dicom_seg'])}")
            parts.append(f'<tr><td>{_esc(r["path"])}</td><td>{_esc(r.get("frames", 1))}</td>'
                         f'<td>{"<br>".join(outs)}</td></tr>')
        parts.append("</table>")

    gallery = sorted(ok, key=lambda r: (dice.get(r["path"], 2.0), r["path"])) if dice else ok
    shown = gallery[:max_gallery]
    parts.append(f"<h2>Gallery{' (worst Dice first)' if dice else ''}</h2>")
    parts.append('<p class="muted">' + "".join(f'<span class="key" style="background:{c}"></span>{html.escape(t)}'
                                             for c, t in _legend(bool(dice))) + "</p>")
    if len(gallery) > len(shown):
        parts.append(f'<p class="muted">showing {len(shown)} of {len(gallery)} images (--max-images)</p>')
    if shown and not any("overlay" in r for r in shown):
        parts.append('<p class="muted">this run wrote no overlays, so the gallery shows masks; '
                     "rerun cp-deploy batch with --overlays to see boxes, points and contours</p>")
    parts.append('<div class="gallery">')
    for r in shown:
        instances = r.get("instances")
        caption = [_esc(r["path"]), f'{len(instances) if isinstance(instances, list) else 0} instance(s), '
                   f'area {_esc(r.get("mask_area", 0))} px, {_esc(r.get("width"))}x{_esc(r.get("height"))}']
        score = scores.get(r["path"])
        if score is not None:
            caption.append(f'Dice <b>{score["dice"]:.4f}</b>, IoU <b>{score["iou"]:.4f}</b>')
        img = _gallery_image(run_dir, r, problems, score["gt"] if score is not None else None)
        parts.append(f'<figure>{img}<figcaption>{"<br>".join(caption)}</figcaption></figure>')
    parts.append("</div>")
    if problems:
        parts += ["<h2>Skipped lines and refused files</h2>",
                  '<p class="muted">results.jsonl lines that are not records, and file names that point outside '
                  "the run folder: they are listed, never read</p>", "<ul>",
                  *(f'<li class="bad">{_esc(m)}</li>' for m in problems), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, gt_dir: str | Path | None = None, output: str | Path | None = None,
                 max_gallery: int = 200) -> Path:
    """Write ``report.html`` (or ``output``) for ``run_dir``; returns its path."""
    path = Path(output) if output is not None else Path(run_dir) / "report.html"
    problems: list[str] = []
    atomic_write_bytes(path, build_report(run_dir, gt_dir, max_gallery, path.parent, problems).encode("utf-8"))
    for message in problems:  # the page lists them too, but a batch job's log should show them
        print(f"cp-deploy: warning: {run_dir}: {message}", file=sys.stderr)
    return path
