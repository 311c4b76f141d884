"""HD95 and NSD in ``cp-deploy eval --surface``: the numbers are MONAI's, on shapes of known geometry."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.errors import MissingExtraError
from cp_deploy.files import write_mask
from cp_deploy.metrics import evaluate_dirs, surface_metrics
from tests.conftest import without_module

monai_metrics = pytest.importorskip("monai.metrics", reason="the 'metrics' extra (MONAI) is not installed")
torch = pytest.importorskip("torch")


def _square(x0: int, y0: int, side: int = 20, size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def _disc(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _monai(pred: np.ndarray, gt: np.ndarray, tol: float) -> tuple[float, float]:
    p, g = (torch.from_numpy(m)[None, None].float() for m in (pred, gt))
    hd = monai_metrics.compute_hausdorff_distance(p, g, include_background=True, percentile=95).item()
    nsd = monai_metrics.compute_surface_dice(p, g, [tol], include_background=True).item()
    return hd, nsd


PAIRS = {
    "square_shift3": (_square(23, 20), _square(20, 20)),
    "square_diag": (_square(22, 24), _square(20, 20)),
    "disc_offset": (_disc(34, 32, 12), _disc(30, 32, 12)),
    "disc_smaller": (_disc(32, 32, 9), _disc(32, 32, 14)),
    "same": (_square(10, 10), _square(10, 10)),
    "both_empty": (np.zeros((64, 64), bool), np.zeros((64, 64), bool)),
    "missed": (np.zeros((64, 64), bool), _disc(32, 32, 10)),
}


@pytest.fixture
def pred_gt(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for name, (p, g) in PAIRS.items():
        write_mask(pred / f"{name}.png", p)
        write_mask(gt / f"{name}.png", g)
    return pred, gt


def test_eval_surface_numbers_are_monais(pred_gt, tmp_path):
    pred, gt = pred_gt
    tol = 2.0
    s = evaluate_dirs(pred, gt, tmp_path / "e.csv", surface=True, nsd_tolerance=tol)
    rows = {r["image"]: r for r in s["rows"]}
    for name, (p, g) in PAIRS.items():
        if not p.any() or not g.any():
            continue
        hd, nsd = _monai(p, g, tol)
        assert rows[name]["hd95"] == pytest.approx(hd, abs=1e-6), name
        assert rows[name]["nsd"] == pytest.approx(nsd, abs=1e-6), name
    # Known geometry: a square shifted by 3 px has every boundary distance 0 or 3.
    assert rows["square_shift3"]["hd95"] == pytest.approx(3.0)
    assert rows["same"]["hd95"] == 0.0 and rows["same"]["nsd"] == 1.0
    # A shift within the tolerance leaves every boundary point within it.
    assert surface_metrics(_square(22, 20), _square(20, 20), tolerance=2)[1] == pytest.approx(1.0)
    # Empty masks, where MONAI gives nan: defined here.
    assert (rows["both_empty"]["hd95"], rows["both_empty"]["nsd"]) == (0.0, 1.0)
    assert (rows["missed"]["hd95"], rows["missed"]["nsd"]) == (None, 0.0)
    assert s["hd95_undefined"] == 1
    defined = [r["hd95"] for r in s["rows"] if r["hd95"] is not None]
    assert s["mHD95"] == pytest.approx(np.mean(defined))
    assert s["mNSD"] == pytest.approx(np.mean([r["nsd"] for r in s["rows"]]))
    with open(tmp_path / "e.csv") as f:
        table = {r["image"]: r for r in csv.DictReader(f)}
    assert table["missed"]["hd95"] == "" and float(table["square_shift3"]["hd95"]) == pytest.approx(3.0)


def test_cli_surface_adds_columns_and_means(pred_gt, tmp_path, capsys):
    pred, gt = pred_gt
    out_csv = tmp_path / "cli.csv"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--csv", str(out_csv), "--json", "--surface",
                 "--nsd-tolerance", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"mHD95", "mNSD", "hd95_undefined"} <= set(summary) and summary["nsd_tolerance"] == 1.0
    assert out_csv.read_text().splitlines()[0] == "image,dice,iou,hd95,nsd"
    # Without --surface the output is as before.
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--csv", str(out_csv), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"n", "mDice", "mIoU"}
    assert out_csv.read_text().splitlines()[0] == "image,dice,iou"


def test_surface_without_the_extra_names_it(pred_gt, monkeypatch, capsys):
    without_module(monkeypatch, "monai")
    pred, gt = pred_gt
    with pytest.raises(MissingExtraError, match="'metrics' extra"):
        evaluate_dirs(pred, gt, surface=True)
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--surface"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics" in err[0]
