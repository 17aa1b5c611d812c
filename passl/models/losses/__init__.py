"""Importing this package registers its modules."""
from passl.models.losses import swav  # noqa: F401
from passl.models.losses import deepclusterv2  # noqa: F401
