"""Registries of datasets and transforms; config blocks select them with ``name:``."""
from passl.registry import Registry

DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
