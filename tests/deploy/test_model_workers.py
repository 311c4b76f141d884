"""``cp-deploy batch --model-workers``: pipeline replicas in threads give the masks and records of
one worker, record a failed batch and go on, resume an interrupted run (under another
arrangement too), resolve ``auto`` from the measured table, and refuse bad values in one line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cp_deploy.cli import main
from cp_deploy.executors import PipelineFactory, local
from cp_deploy.executors.local import AUTO_CPU_THREADS, Arrangement, arrange, run_folder
from cp_deploy.pipeline import CurriculumPipeline
from tests.conftest import make_images


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A failing run must not leave later tests with one torch thread."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _batch(inp: Path, out: Path, bundle, *extra: str) -> int:
    return main(["batch", "--input", str(inp), "--output", str(out), "--bundle", str(bundle.root), "--no-progress",
                 *extra])


def _records(out: Path) -> list[dict]:
    """results.jsonl in file order, without the timings (which differ run to run)."""
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("timings_ms", None)
    return recs


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "masks").glob("*.png"))}


@pytest.fixture
def threads_seen(monkeypatch):
    """The threads ``predict`` ran on; each call waits a little, so a second worker takes the next batch."""
    seen: list[str] = []
    real = CurriculumPipeline.predict

    def predict(self, images, *args, **kwargs):
        seen.append(threading.current_thread().name)
        time.sleep(0.05)
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(CurriculumPipeline, "predict", predict)
    return seen


def test_two_workers_write_the_masks_and_records_of_one(tiny_bundle, tmp_path, threads_seen):
    inp = tmp_path / "in"
    make_images(inp, 7)
    # One torch thread in both: another thread count sums in another order, which can flip a
    # boundary pixel (as --threads always could); the workers themselves must change nothing.
    same = ("--threads", "1", "--batch-size", "2", "--coco")
    assert _batch(inp, tmp_path / "one", tiny_bundle, "--model-workers", "1", *same) == 0
    assert set(threads_seen) == {"MainThread"}
    threads_seen.clear()
    assert _batch(inp, tmp_path / "two", tiny_bundle, "--model-workers", "2", *same) == 0
    assert set(threads_seen) == {"cp-model-0", "cp-model-1"}  # both replicas took batches

    assert len(_masks(tmp_path / "one")) == 7 and _masks(tmp_path / "two") == _masks(tmp_path / "one")
    assert [r["path"] for r in _records(tmp_path / "two")] == [f"img_{i:03d}.png" for i in range(7)]
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    assert (tmp_path / "two" / "instances.json").read_bytes() == (tmp_path / "one" / "instances.json").read_bytes()
    one, two = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert one["settings"] == two["settings"]  # the arrangement is provenance, never compared on --resume
    cores = local.cpu_cores()
    assert one["provenance"]["arrangement"] == {"model_workers": 1, "threads_per_worker": 1, "requested": 1,
                                                "cores": cores}
    assert two["provenance"]["arrangement"] == {"model_workers": 2, "threads_per_worker": 1, "requested": 2,
                                                "cores": cores}


def test_a_failed_batch_is_recorded_and_the_run_goes_on(tiny_bundle, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    make_images(inp, 6)  # sizes cycle, so img_002 and img_005 are the 64x64 ones
    real = CurriculumPipeline.predict

    def predict(self, images, *args, **kwargs):
        if any(im.shape[:2] == (64, 64) for im in images):
            raise RuntimeError("the encoder broke")
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(CurriculumPipeline, "predict", predict)
    for n in ("1", "2"):
        assert _batch(inp, tmp_path / n, tiny_bundle, "--model-workers", n, "--batch-size", "2") == 1
    recs = _records(tmp_path / "2")
    assert recs == _records(tmp_path / "1")
    failed = {r["path"]: r["error"] for r in recs if r["status"] != "ok"}
    assert sorted(failed) == ["img_002.png", "img_005.png"] and all("the encoder broke" in e for e in failed.values())
    assert sum(r["status"] == "ok" for r in recs) == 4 and len(_masks(tmp_path / "2")) == 4


def test_an_interrupted_run_of_two_workers_resumes(tiny_bundle, tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_images(inp, 8)
    real = CurriculumPipeline.predict
    calls: list[int] = []
    lock = threading.Lock()
    interrupt = {"at": 3}

    def flaky(self, images, *args, **kwargs):
        with lock:
            calls.append(len(images))
            n = len(calls)
        if n == interrupt["at"]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while a worker segmented the third batch
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(CurriculumPipeline, "predict", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_folder(PipelineFactory(str(tiny_bundle.root)), inp, out, progress=False, model_workers=2)
    done = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert 2 <= len(done) < 8 and all(r["status"] == "ok" and (out / r["mask"]).is_file() for r in done)
    assert len({r["path"] for r in done}) == len(done)  # each record once
    before = {r["path"]: (out / r["mask"]).stat().st_mtime_ns for r in done}
    assert not list(out.rglob("*.tmp"))  # outputs are atomic: nothing half-written is left

    calls.clear()
    interrupt["at"] = 0
    capsys.readouterr()
    # Another arrangement does not change masks, so --resume takes the folder.
    assert _batch(inp, out, tiny_bundle, "--resume", "--model-workers", "1") == 0
    assert f"{8 - len(done)} ok, 0 failed, {len(done)} skipped" in capsys.readouterr().out
    assert sum(calls) == 8 - len(done)  # nothing done before is segmented again
    recs = _records(out)
    assert [r["path"] for r in recs] == [f"img_{i:03d}.png" for i in range(8)]
    assert all(r["status"] == "ok" for r in recs)
    assert {p: (out / "masks" / p).stat().st_mtime_ns for p in before} == before


def test_auto_is_one_single_thread_worker_per_core_on_a_cpu_and_one_on_a_gpu(monkeypatch):
    """As documented (README, --help): the arrangement measured fastest for every CPU engine."""
    assert set(AUTO_CPU_THREADS) == {"torch", "onnxruntime", "openvino"}  # every CPU engine was measured
    for cores in (1, 2, 4):
        monkeypatch.setattr(local, "cpu_cores", lambda cores=cores: cores)
        for engine in ("torch", "onnxruntime", "openvino"):
            assert arrange("auto", engine, "cpu") == (Arrangement(cores, 1, "auto") if cores > 1
                                                      else Arrangement(1, 0, "auto"))
            assert arrange("auto", engine, "cpu", threads=3) == Arrangement(1, 3, "auto")  # --threads: the user's
        assert arrange("auto", "torch", "cuda") == Arrangement(1, 0, "auto")
        assert arrange("auto", "onnxruntime", "cuda:1") == Arrangement(1, 0, "auto")
        assert arrange("auto", "trt", "cuda") == Arrangement(1, 0, "auto")
        assert arrange(2, "torch", "cpu") == Arrangement(2, max(1, cores // 2), 2)
        assert arrange("1", "torch", "cpu") == Arrangement(1, 0, 1)
        assert arrange(2, "torch", "cpu", threads=2) == Arrangement(2, 2, 2)


def test_auto_is_what_a_cpu_run_records(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(local, "cpu_cores", lambda: 2)
    make_images(tmp_path / "in", 1)
    assert _batch(tmp_path / "in", tmp_path / "out", tiny_bundle, "--device", "cpu") == 0
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["provenance"]["arrangement"]
    assert recorded == {"model_workers": 2, "threads_per_worker": 1, "requested": "auto", "cores": 2}


def test_a_hand_built_pipeline_runs_alone(tiny_bundle, tmp_path):
    make_images(tmp_path / "in", 1)
    pipe = PipelineFactory(str(tiny_bundle.root))()
    from cp_deploy.errors import InputError

    with pytest.raises(InputError, match="cannot be replicated"):
        run_folder(pipe, tmp_path / "in", tmp_path / "out", progress=False, model_workers=2)
    summary = run_folder(pipe, tmp_path / "in", tmp_path / "out2", progress=False)  # auto: 1
    assert summary.ok == 1


@pytest.mark.parametrize("flags, expected", [
    (["--model-workers", "0"], "--model-workers 0: must be auto or a whole number of at least 1"),
    (["--model-workers", "-2"], "--model-workers -2: must be auto"),
    (["--model-workers", "two"], "--model-workers two: must be auto"),
    (["--model-workers", "1.5"], "--model-workers 1.5: must be auto"),
    (["--model-workers", "2", "--executor", "ray"], "with --executor ray pass --num-workers"),
])
def test_bad_values_fail_in_one_line_before_the_models_load(tiny_bundle, tmp_path, capsys, monkeypatch, flags,
                                                             expected):
    monkeypatch.setattr(PipelineFactory, "__call__", lambda self, bundle=None: pytest.fail("models loaded"))
    make_images(tmp_path / "in", 1)
    assert _batch(tmp_path / "in", tmp_path / "out", tiny_bundle, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cp-deploy: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_masks_do_not_depend_on_the_worker_that_made_them(tiny_bundle, tmp_path):
    """Replicas are independent copies: two of them segment the same image to the same mask."""
    factory = PipelineFactory(str(tiny_bundle.root), threads=1)
    a, b = factory(), factory()
    assert a.engine is not b.engine
    image = np.full((96, 128, 3), 60, np.uint8)
    image[30:60, 40:80] = 200
    ra, rb = a.predict([image])[0], b.predict([image])[0]
    assert np.array_equal(ra.mask, rb.mask)
