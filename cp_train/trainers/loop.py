"""The one training loop: epochs, validation mDice, best checkpoint, resume, logs."""

from __future__ import annotations

import io
import json
import math
import pickle
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cp_deploy.errors import CheckpointError
from cp_deploy.files import atomic_write_bytes
from cp_train import distributed


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    resume: bool = False
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none)


def fit(
    name: str,
    model: nn.Module,
    params: list,
    train_epoch: Callable[[nn.Module, torch.optim.Optimizer, int], float],
    validate: Callable[[nn.Module], dict],
    cfg: LoopConfig,
    work_dir: str | Path,
    metric: str = "val mDice",
    progress: bool = False,
) -> dict:
    """Train ``model`` and return its best state dict (by validation mDice).

    ``metric`` names what ``validate``'s ``mDice`` measures (e.g. "val mDice (gt boxes)"), in the
    log and the printed lines; ``progress`` shows a bar over each epoch's optimiser steps.

    ``train_epoch(model, optimiser, epoch)`` returns the epoch's mean loss. After every epoch the
    model is validated, ``last.pt`` (model, optimiser, epoch, best) is written atomically and, on
    a new best, ``best.pt``; with ``cfg.resume`` training continues after the last saved epoch.
    Checkpoints hold tensors and plain data only and are read with ``weights_only=True``, so a
    file planted in the work folder cannot run code; one that is not such a checkpoint raises
    :class:`CheckpointError`.
    AdamW with a cosine schedule over ``cfg.epochs``. With ``cfg.ema`` > 0 a moving average of the
    weights (BatchNorm statistics included) is updated after every step, and it is the average
    that is validated and kept: it is less sensitive to the last few batches than the raw weights,
    which makes the best-epoch pick less of a lottery on a small validation split.

    Under ``torchrun`` ``train_epoch`` gets the model wrapped in DistributedDataParallel, every
    rank validates (the same data, so they agree on the best epoch) and rank 0 alone writes the
    checkpoints and the log; they hold the unwrapped weights, so any world size can resume them.
    """
    work = Path(work_dir) / name
    work.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs) / cfg.epochs))
    )
    ema = _ema(model, cfg.ema, opt)
    bar: list[tqdm] = []  # the running epoch's bar, advanced by every optimiser step
    opt.register_step_post_hook(lambda *_: bar[0].update(1) if bar else None)
    steps: int | None = None  # known after the first epoch
    evaluated = ema.module if ema is not None else model
    start, best, best_state = 0, -1.0, None
    last, best_path, log = work / "last.pt", work / "best.pt", work / "log.jsonl"
    if cfg.resume and last.is_file():
        ck = _load_checkpoint(last, ("model", "optimizer", "scheduler", "epoch", "best"))
        try:
            model.load_state_dict(ck["model"])
            if ema is not None and "ema" in ck:  # else (a run without --ema) the average restarts here
                ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:  # another stage's or architecture's weights
            raise CheckpointError(f"{last}: it does not fit this model ({str(e).splitlines()[0]}); "
                                  f"delete {work} or start without --resume") from None
        start, best = int(ck["epoch"]) + 1, float(ck["best"])
        if distributed.is_main():
            print(f"[{name}] resuming after epoch {ck['epoch'] + 1}/{cfg.epochs} (best mDice {best:.4f})")
    elif distributed.is_main():  # a fresh run: forget an earlier run's log and checkpoints in the same folder
        for stale in (log, last, best_path):
            stale.unlink(missing_ok=True)
    distributed.barrier()  # no rank reads this folder before rank 0 has settled it
    trained = distributed.wrap(model)
    torch.manual_seed(cfg.seed + start)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        lr = opt.param_groups[0]["lr"]  # the epoch's own: the schedule steps once per epoch, after it
        bar[:] = [tqdm(total=steps, desc=f"[{name}] epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=not progress or not distributed.is_main())]
        try:
            loss = train_epoch(trained, opt, epoch)
        finally:
            steps = bar[0].n or steps
            bar.pop().close()
        sched.step()
        evaluated.eval()
        with torch.no_grad():
            val = validate(evaluated)
        rec = {"epoch": epoch + 1, "loss": round(float(loss), 5), **{k: round(float(v), 5) for k, v in val.items()},
               "metric": metric, "lr": lr, "seconds": round(time.perf_counter() - t0, 1)}
        improved = val["mDice"] > best
        if improved:
            best = val["mDice"]
        if distributed.is_main():
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if improved:
                _atomic_save({"model": evaluated.state_dict(), "epoch": epoch,
                              "val": {k: float(v) for k, v in val.items()}}, best_path)
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                          **({"ema": ema.state_dict()} if ema is not None else {})}, last)
            others = "".join(f", {k} {v:.4f}" for k, v in val.items() if k != "mDice")
            print(f"[{name}] epoch {epoch + 1}/{cfg.epochs} lr {lr:.3g} loss {loss:.4f}, {metric} {val['mDice']:.4f}"
                  + others + (" *best*" if improved else ""), flush=True)
        distributed.barrier()  # best.pt is read by every rank at the end
    if best_path.is_file():
        best_state = _load_checkpoint(best_path, ("model",))["model"]
    return best_state if best_state is not None else evaluated.state_dict()


def _ema(model: nn.Module, decay: float, opt: torch.optim.Optimizer):
    """An ``AveragedModel`` of ``model`` updated after each ``opt`` step, or None for decay 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    opt.register_step_post_hook(lambda *_: ema.update_parameters(model))
    return ema


def shuffled_epoch(
    n: int, batch_size: int, seed: int, epoch: int, opt: torch.optim.Optimizer,
    loss_fn: Callable[[np.ndarray, np.random.Generator], torch.Tensor],
) -> float:
    """One pass over ``n`` items in a seeded random order: ``loss_fn(indices, rng)`` gives each
    batch's loss, which is back-propagated and stepped. Returns the mean loss.

    With N ranks each global batch of N x ``batch_size`` is split between them (the same order on
    every rank, from the same seed), and the returned loss is the mean over ranks."""
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n)
    world = distributed.world_size()
    if world > 1:  # each rank its own augmentation noise; one stream would repeat it across ranks
        rng = np.random.default_rng([seed + epoch, distributed.rank()])
    losses = []
    for i in range(0, n, batch_size * world):
        idx = distributed.rank_share(order[i : i + batch_size * world])
        if idx is None:
            continue
        loss = loss_fn(idx, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return distributed.mean_across_ranks(float(np.mean(losses)))


def _atomic_save(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, keys: tuple[str, ...]) -> dict:
    """``path`` read with ``weights_only=True`` (tensors, numbers, strings, lists, dicts), or a
    one-line :class:`CheckpointError` saying what is wrong and how to go on."""
    fix = f"delete {path.parent} or start without --resume"
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; the error below says it all
            warnings.simplefilter("ignore")
            ck = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # the weights-only unpickler met an object it does not allow
        raise CheckpointError(f"{path}: not a checkpoint of plain tensors and data (planted there, or from a "
                              "cp-train that stored other objects), so it was not loaded "
                              f"(nothing in it ran); {fix}") from None
    except Exception:  # torch raises RuntimeError, EOFError, KeyError... for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable (truncated, or not a PyTorch checkpoint); {fix}") from None
    if not isinstance(ck, dict) or any(k not in ck for k in keys):
        raise CheckpointError(f"{path}: not a cp-train checkpoint (it needs {', '.join(keys)}); {fix}")
    return ck
