"""Model builders: SAM variants, the two prompt heads, the detector and the keypoint net."""
