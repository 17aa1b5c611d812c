"""Datasets, transforms and loaders; importing this package registers them."""
from passl.data.registry import DATASETS, TRANSFORMS  # noqa: F401
from passl.data import transforms, multicrop, datasets, shards  # noqa: F401  (register)
from passl.data.loader import build_dataloader, set_loader_epoch  # noqa: F401
