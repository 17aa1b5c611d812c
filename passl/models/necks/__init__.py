"""Importing this package registers its modules."""
from passl.models.necks import swav_neck  # noqa: F401
