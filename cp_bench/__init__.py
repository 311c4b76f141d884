"""``cp-bench``: the measurements users repeat: accuracy over a split, speed against the naive
SamPredictor loop, and peak memory against the number of images."""
