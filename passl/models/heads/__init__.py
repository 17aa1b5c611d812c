"""Importing this package registers its modules."""
from passl.models.heads import swav_prototypes  # noqa: F401
