"""Values the parsers show and the library applies, importable without torch, cv2 or numpy."""

import os
from pathlib import Path

# The prompting schemes a pipeline runs (one row each in pipeline.PROMPT_TABLE).
PROMPT_MODES = ("curriculum", "box", "points", "box+points", "box+mask")
# Largest frame plane (H*W) read, from its header, before decoding: about 400 MB as RGBA.
MAX_PIXELS = 100_000_000
# Normalised surface Dice's tolerance, in pixels.
NSD_TOLERANCE = 2.0
# Where computed things are kept between runs: cp-train's embedding cache, OpenVINO's compiled
# graphs. CP_CACHE_DIR moves it.
DEFAULT_CACHE_DIR = Path(os.environ.get("CP_CACHE_DIR") or Path.home() / ".cache" / "curriculum-prompting")
