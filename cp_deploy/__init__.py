"""curriculum-prompting: batch inference for Curriculum Prompting of SAM (MICCAI 2024)."""

__version__ = "0.1.0"
