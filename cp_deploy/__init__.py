"""curriculum-prompting: batch inference for Curriculum Prompting of SAM (MICCAI 2024)."""

__version__ = "0.1.0"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""
