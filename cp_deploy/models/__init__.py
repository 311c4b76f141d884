"""The networks: SAM and its two prompt heads, and the detector and keypoint families (``registry``)."""
