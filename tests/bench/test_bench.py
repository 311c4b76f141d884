"""``cp-bench`` on the tiny bundle and a tiny synthetic dataset: each command gives the numbers the
product itself gives on the same data."""

from __future__ import annotations

import json

import pytest

from cp_bench import memory
from cp_bench.accuracy import ROWS
from cp_bench.cli import main as bench_main
from cp_deploy.cli import main as deploy_main
from cp_deploy.journal import RESULTS_FILE


@pytest.fixture(scope="module")
def batch_run(tiny_bundle, dataset, tmp_path_factory):
    """``cp-deploy batch`` (curriculum, detector boxes) on the dataset's images."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert deploy_main(["batch", "--input", str(dataset / "images"), "--output", str(out),
                        "--bundle", str(tiny_bundle.root), "--no-progress"]) == 0
    return out


def test_accuracy_row_equals_cp_deploy_eval(tiny_bundle, dataset, batch_run, tmp_path, capsys):
    """The curriculum row's mDice and mIoU are cp-deploy eval's on cp-deploy batch's masks."""
    curriculum = next(i for i, r in enumerate(ROWS, 1) if r.options == {"prompts": "curriculum"})
    assert deploy_main(["eval", "--pred", str(batch_run), "--gt", str(dataset / "masks"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "acc.json"
    assert bench_main(["accuracy", "--bundle", str(tiny_bundle.root), "--data", str(dataset),
                       "--split", str(dataset / "train.txt"), "--cache-dir", str(tmp_path / "cache"),
                       "--rows", f"{curriculum},7", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompts"], r["boxes"]) for r in rows] == [("curriculum", "detector"), ("box", "GT boxes")]
    # Within 1e-3, not equal: the table reads the training cache's fp16 embeddings (1e-5 here).
    assert ev["n"] == 12 and rows[0]["mDice"] == pytest.approx(ev["mDice"], abs=1e-3)
    assert rows[0]["mIoU"] == pytest.approx(ev["mIoU"], abs=1e-3)
    assert f"| curriculum | detector | {rows[0]['mDice']:.4f} |" in printed
    per_image = rows[0]["per_image"]  # the curriculum's gain over its own coarse pass, image by image
    assert len(per_image) == 12 and all("coarse_dice" in p for p in per_image)
    assert sum(p["dice"] for p in per_image) / 12 == pytest.approx(rows[0]["mDice"], abs=1e-4)
    assert "coarse_dice" not in rows[1]["per_image"][0]  # the box pass has no second pass


def test_accuracy_refuses_an_unknown_row(tiny_bundle, dataset, capsys):
    code = bench_main(["accuracy", "--data", str(dataset), "--split", str(dataset / "train.txt"), "--rows", "0,3"])
    err = capsys.readouterr().err
    assert code == 2 and f"row numbers 1..{len(ROWS)}" in err and len(err.strip().splitlines()) == 1


def test_speed_times_the_instances_cp_deploy_finds(tiny_bundle, dataset, batch_run, tmp_path):
    """The timed pipeline finds as many instances per image as cp-deploy batch on the first images,
    and the reference runs in the same call."""
    out = tmp_path / "speed.json"
    assert bench_main(["speed", "--bundle", str(tiny_bundle.root), "--image-dir", str(dataset / "images"),
                       "--images", "4", "--reference", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    records = [json.loads(line) for line in (batch_run / RESULTS_FILE).read_text().splitlines()]
    found = [len(rec["instances"]) for rec in sorted(records, key=lambda rec: rec["path"])[:4]]
    assert r["images"] == 4 and r["ours"]["instances_per_image"] == pytest.approx(sum(found) / 4, abs=0.01)
    assert set(r["ours"]["stage_ms_per_image"]) >= {"encode", "detect", "box", "keypoints", "refine"}
    assert r["speedup"] == pytest.approx(r["ours"]["images_per_s"] / r["reference"]["images_per_s"], abs=0.01)
    assert r["graphs"] is None and r["graph_precisions"] is None  # torch: its precision is "precision"


def test_speed_end_to_end_runs_the_executor_and_the_reference_on_the_same_files(tiny_bundle, dataset, tmp_path):
    """--end-to-end: cp-deploy batch's executor on copies of the images, in the arrangement asked
    for, and the reference on the same files, in one call."""
    out = tmp_path / "e2e.json"
    assert bench_main(["speed", "--bundle", str(tiny_bundle.root), "--image-dir", str(dataset / "images"),
                       "--images", "7", "--end-to-end", "--model-workers", "2", "--reference",
                       "--json", str(out)]) == 0
    e2e = json.loads(out.read_text())["end_to_end"]
    ours, ref = e2e["ours"], e2e["reference"]
    assert ours["images"] == ref["images"] == 7
    assert ours["arrangement"]["model_workers"] == 2 and ours["arrangement"]["requested"] == 2
    assert ours["images_per_s"] == pytest.approx(7 / ours["seconds"], rel=0.01)
    assert e2e["speedup"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"], abs=0.01)


@pytest.mark.parametrize("flags,needle", [(["--end-to-end", "--latency"], "drop --latency"),
                                          (["--end-to-end", "--image-dir", ""], "give --image-dir"),
                                          (["--model-workers", "2"], "--model-workers is for --end-to-end")])
def test_speed_flag_errors_are_one_line_exit_2(tiny_bundle, capsys, flags, needle):
    assert bench_main(["speed", "--bundle", str(tiny_bundle.root), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_memory_runs_each_size_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert bench_main(["memory", "--sizes", "3", "5", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["images"], r["exit_code"], r["records"]) for r in runs] == [(3, 0, 3), (5, 0, 5)]
    assert all(r["peak_rss_mib"] >= r["rss_before_run_mib"] > 0 for r in runs)
    assert "5 vs 3 images: peak RSS" in capsys.readouterr().out
    assert memory.growth_lines(runs)[0].startswith("5 vs 3 images")
