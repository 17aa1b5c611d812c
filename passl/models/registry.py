"""Registries of model parts; config blocks select them with ``name:``."""
from passl.registry import Registry

MODELS = Registry("model")        # architectures: SwAV, Classification
BACKBONES = Registry("backbone")  # ResNet
NECKS = Registry("neck")          # SwAVNeck (projection MLP)
HEADS = Registry("head")          # SwAVPrototypes
LOSSES = Registry("loss")         # SwAVLoss
