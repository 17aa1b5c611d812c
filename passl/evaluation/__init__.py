"""Evaluation: top-k accuracy and kNN."""
