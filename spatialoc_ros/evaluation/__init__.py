"""Evaluation CLIs (``python -m spatialoc_ros.evaluation.coarse`` / ``...pipeline``), metrics and plots."""
