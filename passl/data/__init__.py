"""Datasets, transforms and loaders; importing this package registers them."""
from passl.data.registry import DATASETS, TRANSFORMS  # noqa: F401
