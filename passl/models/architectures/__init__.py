"""Importing this package registers its modules."""
from passl.models.architectures import swav  # noqa: F401
from passl.models.architectures import classification  # noqa: F401
from passl.models.architectures import deepclusterv2  # noqa: F401
