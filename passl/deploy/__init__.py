"""Putting learned features to work: export to a static model, run it with Paddle Inference.

``export`` writes the directory described in :mod:`passl.io.inference_model`;
``engine`` runs such a graph with Paddle Inference (also for the toolkit's own feature
extraction); ``predict`` is ``tools/predict.py``'s loop over image files.
"""
