"""Optimizers and lr schedules; importing this package registers them."""
from passl.solver.registry import LR_SCHEDULERS, OPTIMIZERS  # noqa: F401
