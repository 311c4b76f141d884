"""Data-parallel training on the CPU (gloo): two ranks with batch B train exactly as one process
with batch 2B, share the embedding cache, and ``cp-train`` under torchrun writes one log and one
checkpoint that a single process resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from cp_deploy.bundle import load_bundle
from cp_deploy.models.build import build_models
from cp_train import distributed
from cp_train.cli import main as train_main
from cp_train.data import EmbeddingCache, load_samples
from cp_train.trainers.loop import LoopConfig, fit
from cp_train.trainers.sam import instance_targets, make_sam_epoch

N_IMAGES = 12  # the dataset fixture: one lesion each, so three global batches of 4 per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_box_head(rank: int, world: int, port: int, data: str, bundle: str, work: str, batch: int) -> None:
    """What ``cp-train sam-box`` does, without box jitter, so that the runs can agree exactly."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        assert distributed.init_from_env()
    torch.set_num_threads(1)
    base = load_bundle(bundle)
    models = build_models(base)
    samples = load_samples(data, [f"s{i:02d}" for i in range(N_IMAGES)], progress=False)
    cache = EmbeddingCache(Path(work) / "cache", base, models.image_encoder)
    with torch.no_grad():
        emb = cache.fill(samples, progress=False)
    targets = instance_targets(samples, base.preprocess.image_size, models.box.mask_input_size[0])
    seen = []
    models.box.register_forward_hook(lambda m, i, kw, o: seen.append(kw["boxes"].shape[0]), with_kwargs=True)
    epoch = make_sam_epoch("box", targets, emb, batch, seed=0, box_jitter=0.0)
    fit("sam-box", models.box, list(models.box.parameters()), epoch, lambda m: {"mDice": 0.0},
        LoopConfig(epochs=3, batch_size=batch, lr=1e-3), work)
    (Path(work) / f"rank{rank}.json").write_text(json.dumps({"encoder_calls": cache.encoder_calls, "seen": seen}))
    distributed.shutdown()


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "sam-box" / "log.jsonl").read_text().splitlines()]


def test_two_ranks_train_like_one_process_with_twice_the_batch(dataset, tiny_bundle, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train_box_head(0, 1, 0, str(dataset), str(tiny_bundle.root), str(one), 4)
    mp.spawn(_train_box_head, args=(2, _free_port(), str(dataset), str(tiny_bundle.root), str(two), 2), nprocs=2)

    l1, l2 = [r["loss"] for r in _log(one)], [r["loss"] for r in _log(two)]
    assert len(l2) == 3 and l1[-1] != l1[0]  # one log line per epoch, from rank 0 alone; it trained
    print("losses, 1 process x batch 4:", l1, "2 ranks x batch 2:", l2)
    np.testing.assert_allclose(l2, l1, rtol=1e-3)
    w1 = torch.load(one / "sam-box" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(two / "sam-box" / "last.pt", weights_only=True)["model"]
    assert w1.keys() == w2.keys() and not any(k.startswith("module.") for k in w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank trained on its half of every global batch...
    assert json.loads((one / "rank0.json").read_text())["seen"] == [4, 4, 4] * 3
    assert ranks[0]["seen"] == ranks[1]["seen"] == [2, 2, 2] * 3
    # ...and the cache was built once: each rank encoded its half, and neither the other's.
    assert [r["encoder_calls"] for r in ranks] == [N_IMAGES // 2, N_IMAGES // 2]
    assert len(list((two / "cache").rglob("*.pt"))) == N_IMAGES and not list((two / "cache").rglob("*.tmp"))


def test_cp_train_under_torchrun_then_resumed_by_one_process(dataset, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["sam-box", "--data", str(dataset), "--split", str(dataset / "train.txt"), "--out", str(out),
            "--base", str(tiny_bundle.root), "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25",
            "--threads", "1", "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "cp_train.cli", *args, "--batch-size", "2", "--epochs", "2"],
        capture_output=True, text=True, timeout=300,
        # torchrun's agent leaves a torchelastic_* folder in TMPDIR: keep it in the test's own folder.
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("[sam-box] epoch 2/2") == 1  # rank 0 alone prints
    assert run.stdout.count('"stages": ["sam-box"]') == 1
    work = Path(f"{out}-work")
    assert [r["epoch"] for r in _log(work)] == [1, 2]
    assert load_bundle(out).metadata["trained_sam-box"]["epochs"] == 2
    # Resume the two-rank checkpoint in a single process, with the same global batch.
    assert train_main([*args, "--batch-size", "4", "--epochs", "3", "--resume"]) == 0
    assert "resuming after epoch 2/3" in capsys.readouterr().out
    assert [r["epoch"] for r in _log(work)] == [1, 2, 3]


def test_rank_shares_of_batches_and_of_the_cache(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.rank_share(np.arange(10, 14)).tolist() == [12, 13]
    assert distributed.rank_share(np.arange(10, 13)).tolist() == [12]  # uneven: near-equal shares
    assert distributed.rank_share(np.arange(10, 11)) is None  # rank 1 would have nothing: all skip
    assert distributed.shard(list("abcde")) == [1, 3]
