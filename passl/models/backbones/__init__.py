"""Importing this package registers its modules."""
from passl.models.backbones import resnet  # noqa: F401
