"""Hooks; importing this package registers them."""
from passl.engine.hooks.base import HOOKS, Hook, Priority  # noqa: F401
from passl.engine.hooks import swav_hook, deepclusterv2_hook  # noqa: F401
from passl.engine.hooks import checkpoint_hook, health_hook, logger_hook  # noqa: F401
from passl.engine.hooks import eval_hook, knn_hook  # noqa: F401
