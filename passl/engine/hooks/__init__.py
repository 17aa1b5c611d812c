"""Hooks; importing this package registers them."""
from passl.engine.hooks.base import HOOKS, Hook, Priority  # noqa: F401
