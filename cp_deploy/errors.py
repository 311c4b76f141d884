"""The one error hierarchy: every failure a user can act on, with the exit code a CLI gives it.

Messages name the file (or flag) and the fix, on one line. A CLI maps :class:`UsageError` to
exit 2 and any other :class:`CPError` to exit 1; nothing else is caught, so a bug still shows
its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path

EXTRA_HINT = "pip install 'curriculum-prompting[{extra}]'"


class CPError(RuntimeError):
    """A failure the user can act on; the message names the file and the fix."""

    exit_code = 1


class UsageError(CPError):
    """What the user passed cannot be used: a flag, a path, a file or a bundle."""

    exit_code = 2


class InputError(UsageError):
    """An input folder or file cannot be used."""


class BundleError(UsageError):
    """A bundle is missing, malformed, or one of its files is missing or corrupt."""


class WeightsError(UsageError):
    """A weight file is missing, corrupt, unsafe to load, or does not fit its model."""


class EngineError(UsageError):
    """Exported graphs or engines cannot serve this run."""


class DataError(UsageError):
    """A training dataset or split cannot be used."""


class RecipeError(UsageError):
    """A training recipe that cannot be trained from the given base."""


class CheckpointError(UsageError):
    """A training checkpoint that ``--resume`` cannot use."""


class MissingExtraError(UsageError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    @classmethod
    def for_file(cls, path: Path | str, what: str, extra: str) -> MissingExtraError:
        """The error of a file whose format needs ``extra``."""
        e = cls(f"{path}: reading {what} needs the '{extra}' extra, which is not installed; "
                f"run: {EXTRA_HINT.format(extra=extra)}")
        e.extra = extra
        return e

    @classmethod
    def for_feature(cls, feature: str, extra: str) -> MissingExtraError:
        """The error of a feature (a flag and what it does) that needs ``extra``."""
        e = cls(f"{feature} needs the '{extra}' extra, which is not installed; run: {EXTRA_HINT.format(extra=extra)}")
        e.extra = extra
        return e


class WriteFailed(CPError):
    """Writing an output failed mid-run (a full disk); the journal keeps what was finished."""

    @classmethod
    def of(cls, e: BaseException) -> WriteFailed:
        if not isinstance(e, OSError):
            return cls(f"writing outputs failed: {e!r}; fix that, then rerun with --resume")
        fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make the output folder writable"
        return cls(f"{e.filename}: cannot write ({e.strerror}); {fix}, then rerun with --resume")


class ParityError(CPError):
    """Exported graphs disagree with the torch engine beyond the tolerances."""


def run_command(prog: str, command: Callable[[], int]) -> int:
    """What every CLI does around its command: a :class:`CPError` becomes one line on stderr and
    its exit code."""
    try:
        return command()
    except CPError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
