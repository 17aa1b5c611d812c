"""Importing this package registers its modules."""
from passl.models.losses import swav  # noqa: F401
