"""Values the parsers show and the library applies, importable without torch, cv2 or numpy."""

# The prompting schemes a pipeline runs (one row each in pipeline.PROMPT_TABLE).
PROMPT_MODES = ("curriculum", "box", "points", "box+points", "box+mask")
# Largest frame plane (H*W) read, from its header, before decoding: about 400 MB as RGBA.
MAX_PIXELS = 100_000_000
# Normalised surface Dice's tolerance, in pixels.
NSD_TOLERANCE = 2.0
