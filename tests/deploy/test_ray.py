"""cp-deploy batch --executor ray on a local two-CPU Ray cluster: the same outputs as the local
executor image for image, a worker killed mid-run, --resume, and the missing-extra message."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from cp_deploy.cli import main
from cp_deploy.executors import PipelineFactory
from cp_deploy.executors.local import run_folder
from cp_deploy.executors.ray import run_folder_ray
from cp_deploy.pipeline import CurriculumPipeline
from tests.conftest import make_images

# Two actors on two logical CPUs still leave room for the decoding tasks.
POOL = {"num_workers": 2, "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    inp = tmp_path_factory.mktemp("ray_in")
    make_images(inp, 4)
    make_images(inp / "sub", 3, seed=1)
    cv2.imwrite(str(inp / "gray16.tif"), (np.random.default_rng(0).random((45, 61)) * 60000).astype(np.uint16))
    cv2.imwrite(str(inp / "gray.bmp"), np.full((30, 50), 128, np.uint8))
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return inp


@pytest.fixture(scope="module")
def local_run(tiny_bundle, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_out")
    run_folder(PipelineFactory(str(tiny_bundle.root))(), inputs, out, batch_size=2, overlays=True, progress=False)
    return out


def _records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("timings_ms", None)  # wall-clock times differ from run to run; error records have none
    return recs


def _assert_same_outputs(out: Path, ref: Path) -> None:
    recs = _records(out)
    assert recs == _records(ref)
    assert len({r["path"] for r in recs}) == len(recs)
    for r in recs:
        for key in ("mask", "overlay"):
            if key in r:
                assert (out / r[key]).read_bytes() == (ref / r[key]).read_bytes(), r[key]
    assert not (out / "results.jsonl.partial").exists()


def test_ray_outputs_equal_local(ray_cluster, tiny_bundle, inputs, local_run, tmp_path):
    out = tmp_path / "ray"
    s = run_folder_ray(PipelineFactory(str(tiny_bundle.root)), inputs, out, batch_size=2, overlays=True,
                       progress=False, **POOL)
    assert (s.total, s.ok, s.failed, s.skipped) == (10, 9, 1, 0)
    _assert_same_outputs(out, local_run)
    assert len(_records(out)) == 10


@dataclass(frozen=True)
class KillOnce:
    """Builds the pipeline; the first worker to segment anything writes its PID to ``marker``
    and SIGKILLs its own process, as a crashed or preempted worker would."""

    factory: PipelineFactory
    marker: str

    def __call__(self) -> CurriculumPipeline:
        pipeline = self.factory()
        predict = pipeline.predict

        def predict_or_die(images):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return predict(images)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

        pipeline.predict = predict_or_die
        return pipeline


def test_killed_worker_is_retried_and_every_image_done_once(ray_cluster, tiny_bundle, inputs, local_run, tmp_path):
    marker = tmp_path / "killed.pid"
    out = tmp_path / "ray"
    s = run_folder_ray(KillOnce(PipelineFactory(str(tiny_bundle.root)), str(marker)), inputs, out,
                       batch_size=2, overlays=True, progress=False, **POOL)
    pid = int(marker.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker really died
    assert (s.ok, s.failed) == (9, 1)
    _assert_same_outputs(out, local_run)


def test_cli_resume_on_ray_redoes_only_what_is_missing(ray_cluster, tiny_bundle, inputs, local_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    (out / "masks" / "img_000.png").unlink()  # a lost output is redone
    results = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(results[:-2]) + "\n")  # records of a killed run
    (out / "results.jsonl.partial").write_text(results[-2] + "\n" + results[-1][:25])  # torn last line
    args = ["batch", "--input", str(inputs), "--output", str(out), "--bundle", str(tiny_bundle.root),
            "--executor", "ray", "--num-workers", "1", "--batch-size", "2", "--overlays", "--resume", "--no-progress"]
    assert main(args) == 1  # broken.jpg still fails
    printed = capsys.readouterr().out
    # Redone: the lost mask, the torn record and broken.jpg (failed images are retried); the
    # journal's complete record counts as done.
    assert "2 ok, 1 failed, 7 skipped (already done) of 10 images" in printed, printed
    _assert_same_outputs(out, local_run)


def test_missing_ray_names_the_extra(tiny_bundle, image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    rc = main(["batch", "--input", str(image_dir), "--output", str(tmp_path / "o"), "--bundle", str(tiny_bundle.root),
               "--executor", "ray", "--no-progress"])
    assert rc == 2
    assert "pip install 'curriculum-prompting[ray]'" in capsys.readouterr().err
