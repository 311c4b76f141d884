"""Training as a library: ``cp_train.stages`` (one module per stage, each with its recipe),
``cp_train.data.Dataset``, ``cp_train.validate`` and ``cp_train.ensemble``; ``cp-train`` maps flags onto them."""
