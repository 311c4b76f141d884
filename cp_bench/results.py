"""Measurement results as JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from cp_deploy.files import atomic_write_bytes


def write_json(path: str | Path | None, obj: object, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically; ``None`` writes nothing."""
    if path:
        atomic_write_bytes(Path(path), (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))
