"""The training defaults ``cp-train --help`` shows and the stage recipes (``cp_train.stages``)
use, importable without torch."""

from __future__ import annotations

from cp_deploy.constants import DEFAULT_CACHE_DIR  # noqa: F401  (the CLIs read it here)

STAGE_NAMES = ("detector", "sam-box", "sam-refine", "keypoints")  # the order ``train_stages`` keeps
STAGE_EPOCHS = {"detector": 8, "sam-box": 3, "sam-refine": 3, "keypoints": 6}
DETECTOR_ARCH = "lite0_centernet"
DETECTOR_SIZE = 256
DETECTOR_FREEZE = 2
POINT_JITTER = 0.02
