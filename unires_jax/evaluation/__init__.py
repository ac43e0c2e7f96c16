"""Evaluation of referring expression segmentation: metrics and trivial baselines."""
