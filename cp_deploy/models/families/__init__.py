"""The built-in model families, one per file; importing this package registers them all."""

from cp_deploy.models.families import (  # noqa: F401
    centernet_embedding,
    centernet_timm,
    embedding_heatmap,
    grounding_dino,
    topdown_heatmap,
)
