"""PASSL-SwAV: self-supervised SwAV pretraining and evaluation in PaddlePaddle."""

__version__ = "0.1.0"
