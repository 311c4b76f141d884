"""The journal stage of a run: records reach ``results.jsonl`` only after their files are written,
files of several frames are assembled until their last frame is in, and the run is counted.

Records are keyed by journal key and files by path, so a record that arrives twice (a batch Ray
reran after a worker died) changes nothing, and records may come before or after their file's
:class:`FileWork`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cp_deploy.executors.core import FileWork
from cp_deploy.executors.output import write_run_info
from cp_deploy.executors.records import RunSummary
from cp_deploy.journal import RunJournal


class Ledger:
    """Journals records in batches (:meth:`flush`), hands out files whose frames are all written
    (to :func:`cp_deploy.executors.core.finish_file`) and counts ok, failed and skipped images."""

    def __init__(self, journal: RunJournal, skipped: int, unreadable: int) -> None:
        self.journal = journal
        self.skipped = skipped
        self.unreadable = unreadable  # folders that could not be listed, each a failure
        self._files: dict[str, FileWork] = {}  # files whose frames are still coming
        self._frames: dict[str, dict[str, dict]] = {}  # file -> this run's frame records
        self._masks: dict[str, dict[str, np.ndarray]] = {}  # file -> frame masks kept in memory
        self._handed_out: set[str] = set()
        self._outcome: dict[str, bool] = {}  # journal key -> ok, for the counts
        self._pending: list[dict] = []

    def open(self, work: FileWork) -> list[FileWork]:
        """Expect the frames of ``work``; returns it when they are all in already."""
        if work.rel in self._files or work.rel in self._handed_out:
            return []
        self._files[work.rel] = work
        self.skipped += len(work.earlier)
        return self._ready(work.rel)

    def add(self, rec: dict, source: str | None = None, mask: np.ndarray | None = None) -> list[FileWork]:
        """The record of a written image, or of a frame of ``source``; returns the files now complete."""
        if source is None or "frame" in rec:  # a file's single frame waits for the file's record
            self._pending.append(rec)
            self._outcome[rec["path"]] = rec["status"] == "ok"
        if source is None or source in self._handed_out:
            return []
        self._frames.setdefault(source, {})[rec["path"]] = rec
        if mask is not None:
            self._masks.setdefault(source, {})[rec["path"]] = mask
        return self._ready(source)

    def _ready(self, rel: str) -> list[FileWork]:
        work = self._files.get(rel)
        frames = self._frames.get(rel, {})
        # Keys done earlier never become work items, and ``frames`` is keyed by journal key (a
        # record Ray delivers twice counts once), so the counts say when every frame is in.
        if work is None or len(frames) + len(work.earlier) < len(work.labels):
            return []
        self._handed_out.add(rel)
        return [self._files.pop(rel)]

    def inputs(self, work: FileWork) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
        """The frame records (earlier runs' and this one's) and in-memory masks of a complete file."""
        records = {k: self.journal.records[k] for k in work.earlier}
        records.update(self._frames.pop(work.rel, {}))
        return records, self._masks.pop(work.rel, {})

    def close(self, work: FileWork, rec: dict, records: dict[str, dict]) -> None:
        """The file's own record, from ``finish_file`` over ``records`` (:meth:`inputs`). A file of
        one frame counts once; one of several fails on its own only where its frames were ok (its
        file output failed)."""
        self._pending.append(rec)
        if not work.multi:
            self._outcome[rec["path"]] = rec["status"] == "ok"
        elif rec["status"] != "ok" and all(records[k]["status"] == "ok" for k in work.keys()):
            self._outcome[rec["path"]] = False

    def flush(self) -> None:
        """Journal (fsynced) the records added since the last flush."""
        if self._pending:
            records, self._pending = self._pending, []
            self.journal.append(records)

    def summarise(self, out: Path, seconds: float, batch_size: int, settings: dict) -> RunSummary:
        """The run's counts (failed: with unlistable folders and failed file outputs), also
        written to ``run.json``."""
        ok = sum(self._outcome.values())
        failed = len(self._outcome) - ok + self.unreadable
        summary = RunSummary(ok + failed + self.skipped, ok, failed, self.skipped, seconds, out)
        write_run_info(out, summary.run_info(batch_size, settings))
        return summary
