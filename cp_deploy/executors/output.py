"""The output folder of a run: checked, locked and described before any model loads.

:func:`claim_output` is what every executor calls first. It refuses an output folder inside the
input (a rerun would segment its own masks), one it cannot write, a non-empty one without
``resume`` or ``overwrite``, one another run holds, and a ``resume`` whose settings differ from
those recorded in ``run.json``. It holds an exclusive ``flock`` on ``OUT/.cp-deploy.lock`` until
the run ends; the kernel drops the lock with the process, so a killed run never blocks the next.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cp_deploy.errors import InputError
from cp_deploy.executors.inputs import Inputs
from cp_deploy.files import atomic_write_bytes
from cp_deploy.journal import JOURNAL_FILE, RESULTS_FILE

RUN_FILE = "run.json"
LOCK_FILE = ".cp-deploy.lock"
PROBE_FILE = ".cp-deploy.probe"
# Everything a run or `cp-deploy eval | report` writes; --overwrite removes these and nothing else.
OWNED = ("masks", "overlays", RESULTS_FILE, JOURNAL_FILE, RUN_FILE, "eval.csv", "report.html", "instances.json")


class RunSettings(dict):
    """A run's settings (what ``--resume`` compares, the dict itself) carrying its ``provenance``
    (bundle name, device, versions, command, start time: what made the masks, never compared),
    which :func:`write_run_info` writes beside them wherever the settings go."""

    provenance: dict | None = None


def read_run_info(out: Path, problems: list[str] | None = None) -> dict:
    """``OUT/run.json``, or ``{}`` where it is missing or unreadable (said in ``problems``)."""
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if problems is not None:
            problems.append(f"{RUN_FILE}: unreadable or not valid JSON ({e})")
        return {}
    return info if isinstance(info, dict) else {}


def write_run_info(out: Path, info: dict) -> None:
    """``OUT/run.json``; settings that carry a provenance (:class:`RunSettings`) add it as ``provenance``."""
    provenance = getattr(info.get("settings"), "provenance", None)
    if provenance is not None:
        info = {**info, "provenance": provenance}
    atomic_write_bytes(out / RUN_FILE, json.dumps(info, indent=1).encode("utf-8"))


def _check_location(inputs: Inputs, out: Path) -> None:
    out = out.resolve()
    rescanned = inputs.rescanned.resolve() if inputs.rescanned is not None else None
    if rescanned is not None and (out == rescanned or rescanned in out.parents):
        raise InputError(f"{out}: --output is inside --input '{rescanned}', so a rerun would segment the run's own "
                         "masks and overlays; pass an --output outside the input folder")
    inside = [f for f in inputs.files if out in (inputs.root / f).resolve().parents]
    if inside:
        raise InputError(f"{out}: --output holds the input {inputs.root / inside[0]}, which --overwrite could "
                         "remove; pass an --output that holds no input")


def _probe(out: Path) -> None:
    """Create ``out`` and write a file there, so an unusable folder fails before the models load."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --output is a file; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror}); pass an --output whose "
                         "parents are folders you can write") from e
    try:
        atomic_write_bytes(out / PROBE_FILE, b"cp-deploy checks that it can write here\n")
        (out / PROBE_FILE).unlink()
    except OSError as e:
        raise InputError(f"{out}: cannot write to the output folder ({e.strerror}); make it writable, free "
                         "space, or pass another --output") from e


def _lock(out: Path) -> int:
    """An exclusive flock on ``OUT/.cp-deploy.lock``, which names its holder for the next run."""
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{path}: cannot open the run lock ({e.strerror}); make it writable, or pass another "
                         "--output") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 1 << 16) or b"{}")
        except ValueError:  # written at this very moment
            holder = {}
        os.close(fd)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        raise InputError(f"{path}: another cp-deploy run is writing to {out} ({who}: {holder.get('command', '?')}); "
                         "wait for it to end, or pass another --output") from None
    except BaseException:
        os.close(fd)
        raise
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
    return fd


def _clear(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty folder unless resuming; with ``overwrite``, remove what cp-deploy owns."""
    if resume:
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise InputError(f"{out}: the output folder is not empty ({shown}); pass --resume to continue the run "
                         "there, --overwrite to replace cp-deploy's outputs in it, or another --output")
    for name in OWNED:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _check_settings(out: Path, settings: dict) -> None:
    """A resumed run must have the settings of the run that wrote the folder."""
    recorded = read_run_info(out).get("settings")
    if recorded is None:
        if (out / RESULTS_FILE).exists() or (out / JOURNAL_FILE).exists():
            raise InputError(f"{out / RUN_FILE}: the run in {out} recorded no settings (an older cp-deploy made "
                             "it), so --resume cannot tell whether its masks match; rerun with --overwrite or "
                             "pass another --output")
        return
    now = json.loads(json.dumps(settings))  # as it will read back from run.json (tuples -> lists)
    differ = sorted(k for k in now.keys() | recorded.keys() if now.get(k) != recorded.get(k))
    if differ:
        changes = "; ".join(f"{k}: {recorded.get(k)!r} then, {now.get(k)!r} now" for k in differ)
        raise InputError(f"{out / RUN_FILE}: --resume with other settings than the run there ({changes}); "
                         "rerun with the same settings, pass another --output, or --overwrite")


@contextmanager
def claim_output(inputs: Inputs, output_dir: str | Path, settings: dict, resume: bool = False,
                 overwrite: bool = False) -> Iterator[None]:
    """Check and lock the output folder for one run (see the module docstring), held while the
    ``with`` body runs. Nothing is loaded or segmented yet; on ``resume``, ``settings``
    (:func:`cp_deploy.executors.run_settings`) must equal those in ``run.json``."""
    out = Path(output_dir)
    if resume and overwrite:
        raise InputError(f"{out}: --resume and --overwrite contradict each other; pass one of them")
    _check_location(inputs, out)
    _probe(out)
    fd = _lock(out)
    try:
        _clear(out, resume, overwrite)
        if resume:
            _check_settings(out, settings)
        if isinstance(settings, RunSettings) and settings.provenance is not None:
            settings.provenance["resumed"] = resume  # earlier masks of the folder came from the run it continues
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays, so a waiting opener never locks a deleted one
