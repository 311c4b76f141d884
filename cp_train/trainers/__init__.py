"""One training loop (loop.py) and a small file per model."""
