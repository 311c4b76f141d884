"""The resumable run journal: one record per image, durable as images finish."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from cp_deploy.files import atomic_write_bytes

RESULTS_FILE = "results.jsonl"
JOURNAL_FILE = "results.jsonl.partial"


class RunJournal:
    """Per-image records of one output folder, safe against a killed process.

    Records are appended to ``results.jsonl.partial`` and fsynced as images finish; a torn last
    line (the process died mid-write) is ignored on reading. ``finalize`` merges everything into
    ``results.jsonl`` (one line per image, sorted by path) with an atomic rename. An image counts
    as done when its record says ``ok`` and its mask file exists, so ``--resume`` redoes failed
    images and anything whose outputs were lost.

    Memory stays flat however many images a run has: ``records`` holds only the fields resume
    and planning read (:data:`SUMMARY_KEYS`), and each full record stays on disk, found again by
    its file and byte offset when ``finalize`` or :meth:`full_records` needs it.
    """

    SUMMARY_KEYS = ("path", "status", "mask", "outputs", "frames", "folder")

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.results = self.out_dir / RESULTS_FILE
        self.journal = self.out_dir / JOURNAL_FILE
        self.records: dict[str, dict] = {}  # path -> summary of its latest record
        self.bad_lines: list[str] = []  # "results.jsonl line 7: no 'path' key", filled by load
        self._where: dict[str, tuple[Path, int, int]] = {}  # path -> (file, offset, length) of its latest line
        self._fh = None

    def _keep(self, rec: dict, where: tuple[Path, int, int]) -> None:
        self.records[rec["path"]] = {k: rec[k] for k in self.SUMMARY_KEYS if k in rec}
        self._where[rec["path"]] = where

    def _read(self, path: Path) -> None:
        """Index the records of ``path``; a line that is not a record is noted in ``bad_lines``,
        except the torn lines killed runs leave in the journal (fsynced line by line, never renamed)."""
        if not path.exists():
            return
        offset = 0
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if path != self.journal:
                        self.bad_lines.append(f"{path.name} line {n}: not valid JSON")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
                    self.bad_lines.append(f"{path.name} line {n}: no 'path' key")
                    continue
                self._keep(rec, (path, start, len(raw)))

    def load(self) -> None:
        """Read earlier records (final file first, then the newer journal); lines that are not
        records are skipped and listed in ``bad_lines``."""
        self._read(self.results)
        self._read(self.journal)

    def full_records(self) -> Iterator[dict]:
        """Every record in full, sorted by path, read back from disk one at a time."""
        files: dict[Path, object] = {}
        try:
            for p in sorted(self.records):
                path, offset, length = self._where[p]
                f = files.get(path) or files.setdefault(path, path.open("rb"))
                f.seek(offset)
                yield json.loads(f.read(length))
        finally:
            for f in files.values():
                f.close()

    def done(self) -> set[str]:
        """Paths whose record is ``ok`` and whose every output file (mask, and any format
        outputs such as a DICOM-SEG) is still there."""
        return {p for p, r in self.records.items() if r.get("status") == "ok" and self.outputs_exist(r)}

    def outputs_exist(self, record: dict) -> bool:
        """A multi-frame file's own record may list no files (no format output for it)."""
        files = ([record["mask"]] if "mask" in record else []) + list(record.get("outputs", {}).values())
        return (bool(files) or "frames" in record) and all((self.out_dir / f).is_file() for f in files)

    def reset(self) -> None:
        """Start afresh: forget records and remove the old journal and results."""
        self.close()
        self.records.clear()
        self._where.clear()
        for p in (self.journal, self.results):
            p.unlink(missing_ok=True)

    def append(self, records: list[dict]) -> None:
        """Journal ``records`` durably; an OSError (a full disk) names the journal file."""
        try:
            if self._fh is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.journal, "ab")  # noqa: SIM115 - closed in finalize
                if self._fh.tell():
                    with open(self.journal, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            self._fh.write(b"\n")  # end a killed run's torn line, or the next record joins it
            for rec in records:
                line = (json.dumps(rec, separators=(",", ":")) + "\n").encode("utf-8")
                self._keep(rec, (self.journal, self._fh.tell(), len(line)))
                self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.journal)) from e

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self) -> None:
        self.close()
        lines = b"".join(json.dumps(rec, separators=(",", ":")).encode("utf-8") + b"\n"
                         for rec in self.full_records())
        atomic_write_bytes(self.results, lines)
        self.journal.unlink(missing_ok=True)
