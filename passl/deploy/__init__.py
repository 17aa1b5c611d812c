"""Putting learned features to work: export to a static model, run it with Paddle Inference
or, as ONNX, with onnxruntime.

``export`` writes the directory described in :mod:`passl.io.inference_model` (or
:mod:`passl.io.onnx_model`); ``engine`` runs such a graph with Paddle Inference (also for the
toolkit's own feature extraction); ``onnx_runtime`` converts graphs to ONNX and runs them;
``predict`` is ``tools/predict.py``'s loop over image files.
"""
