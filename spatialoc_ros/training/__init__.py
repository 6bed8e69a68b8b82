"""Training CLIs of the coarse (retrieval) and fine (UGFL) stages: ``python -m
spatialoc_ros.training.coarse`` and ``python -m spatialoc_ros.training.fine``."""
