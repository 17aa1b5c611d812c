"""Optimizers and lr schedules; importing this package registers them."""
from passl.solver.registry import LR_SCHEDULERS, OPTIMIZERS  # noqa: F401
from passl.solver import lars, lr_scheduler, optimizers  # noqa: F401,E402
