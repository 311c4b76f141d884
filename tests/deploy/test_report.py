"""cp-deploy report: the page's content, Dice ordering, and the page in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.files import read_mask
from cp_deploy.metrics import dice
from cp_deploy.report import STAGE_ORDER, build_report
from tests.conftest import make_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tiny_bundle, tmp_path_factory):
    """A small run with overlays, one unreadable file, and ground truth of varying quality."""
    base = tmp_path_factory.mktemp("report")
    inp, out, gt = base / "in", base / "out", base / "gt"
    make_images(inp, 3, sizes=((64, 80),))
    (inp / "broken.png").write_bytes(b"not a png")
    assert main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(tiny_bundle.root),
                 "--overlays", "--no-progress"]) == 1
    gt.mkdir()
    for i in range(3):
        pred = read_mask(out / f"masks/img_{i:03d}.png")
        g = pred.copy()
        # Ground truth that agrees with the prediction less and less: the gallery must reverse it.
        g[: (i + 1) * 16] = ~g[: (i + 1) * 16]
        cv2.imwrite(str(gt / f"img_{i:03d}.png"), g.astype(np.uint8) * 255)
    return out, gt


def test_report_content_and_worst_first(run_dir):
    out, gt = run_dir
    assert main(["report", str(out), "--gt", str(gt)]) == 0
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # Counts, the failure, throughput and the stage chart.
    assert re.search(r"<b>4</b><span>images</span>", page) and re.search(r"<b>3</b><span>segmented</span>", page)
    assert "broken.png" in page and "cannot decode the image" in page
    assert "images/s (last run, wall clock)" in page
    for stage in ("decode", "encode", "box", "keypoints", "refine", "write"):
        assert f">{stage}</text>" in page
    # The gallery: every segmented image embedded, with its Dice, worst first.
    assert page.count('<img src="data:image/jpeg;base64,') == 3
    expected = {f"img_{i:03d}.png": dice(read_mask(out / f"masks/img_{i:03d}.png"), read_mask(gt / f"img_{i:03d}.png"))
                for i in range(3)}
    shown = re.findall(r"<figcaption>([^<]+)<br>.*?Dice <b>([0-9.]+)</b>", page)
    assert [name for name, _ in shown] == sorted(expected, key=expected.get)
    for name, value in shown:
        assert float(value) == pytest.approx(expected[name], abs=1e-4)
    assert "mean Dice" in page


def test_report_without_overlays_or_gt(run_dir, tmp_path):
    out, _ = run_dir
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("overlays", "report.html"))
    for p in bare.glob("results.jsonl"):
        p.write_text(re.sub(r',"overlay":"[^"]*"', "", p.read_text()))
    page = build_report(bare)
    assert "wrote no overlays" in page and page.count('<img src="data:image/png;base64,') == 3
    assert "Dice" not in page
    assert list(STAGE_ORDER[:2]) == ["decode", "preprocess"]


def test_report_needs_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl not found" in capsys.readouterr().err


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_report_in_headless_chromium(run_dir, tmp_path):
    out, gt = run_dir
    report = tmp_path / "report.html"
    assert main(["report", str(out), "--gt", str(gt), "--output", str(report)]) == 0

    # The check itself must see console errors: a page that makes one.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('probe'); missingFn();</script></body></html>")
    probe = _chromium(["--dump-dom", bad.as_uri()], tmp_path)
    assert any("probe" in m for m in _console_messages(probe.stderr)), probe.stderr[-2000:]

    dom = _chromium(["--dump-dom", report.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == []
    assert 'class="gallery"' in dom.stdout and dom.stdout.count("<figure>") == 3

    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1000,1400", report.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (1400, 1000)
    # Not blank: the page background plus the gallery's overlays, whose tinted green is distinctive.
    assert img.std() > 20
    green = (img[..., 1] > 150) & (img[..., 0] < 100) & (img[..., 2] < 100)
    assert green.sum() > 500


def _crafted_run(run_dir, tmp_path: Path, lines: list[str]) -> Path:
    out, _ = run_dir
    crafted = tmp_path / "crafted"
    shutil.copytree(out, crafted, ignore=shutil.ignore_patterns("report.html"))
    results = crafted / "results.jsonl"
    results.write_text(results.read_text() + "".join(line + "\n" for line in lines))
    return crafted


def test_report_embeds_only_files_inside_the_run(run_dir, tmp_path, capsys):
    """A record's mask or overlay naming a file elsewhere (``..``, an absolute path, a symlink out
    of the run folder) is refused and listed, never embedded."""
    import base64
    import json

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret bytes of another folder")
    leak = base64.b64encode(secret.read_bytes()).decode("ascii")
    records = [
        {"path": "up.png", "status": "ok", "mask": "../secret.png"},
        {"path": "abs.png", "status": "ok", "mask": "masks/img_000.png", "overlay": str(secret)},
        {"path": "link.png", "status": "ok", "mask": "masks/link.png"},
        {"path": "deep.png", "status": "ok", "mask": "masks/../../../../../../../../etc/passwd"},
        {"path": "out.dcm", "status": "ok", "frames": 1, "outputs": {"seg": "../secret.png"}},
    ]
    crafted = _crafted_run(run_dir, tmp_path, [json.dumps(r) for r in records])
    (crafted / "masks" / "link.png").symlink_to(secret)
    assert main(["report", str(crafted)]) == 0
    page = (crafted / "report.html").read_text()
    assert leak not in page and "../secret.png\"" not in page and "root:" not in page
    assert base64.b64encode(Path("/etc/passwd").read_bytes()[:30]).decode()[:30] not in page
    assert page.count("refused:") == 5
    err = capsys.readouterr().err
    for name in ("up.png", "abs.png", "link.png", "deep.png", "out.dcm"):
        assert f"record '{name}'" in err and f"record &#x27;{name}&#x27;" in page
    # The run's own images are still embedded.
    assert page.count('<img src="data:image/jpeg;base64,') == 3


def test_report_lists_lines_that_are_not_records(run_dir, tmp_path, capsys):
    crafted = _crafted_run(run_dir, tmp_path, ['{"status": "ok", "mask": "masks/img_000.png"}', "[1, 2]"])
    n = len((crafted / "results.jsonl").read_text().splitlines())
    assert main(["report", str(crafted)]) == 0
    page = (crafted / "report.html").read_text()
    err = capsys.readouterr().err
    for line in (n - 1, n):
        assert f"results.jsonl line {line}: no &#x27;path&#x27; key" in page
        assert f"results.jsonl line {line}: no 'path' key" in err
    assert "Traceback" not in err


def test_report_escapes_every_record_field(run_dir, tmp_path):
    import json

    evil = "<img src=x onerror=alert(1)>"
    records = [
        {"path": "a.png", "status": "ok", "mask": "masks/img_000.png", "width": evil, "height": evil,
         "mask_area": evil, "instances": evil, "timings_ms": {evil: 5.0, "encode": "slow"}},
        {"path": "b.dcm", "status": "ok", "frames": evil, "outputs": {evil: "masks/img_001.png"}, "dicom_seg": evil},
        {"path": "c.png", "status": "error", "error": evil, "timings_ms": {evil: "x"}},
    ]
    crafted = _crafted_run(run_dir, tmp_path, [json.dumps(r) for r in records])
    page = build_report(crafted)
    assert evil not in page and "onerror=alert(1)&gt;" in page
