"""Registries of optimizers and learning-rate schedules."""
from passl.registry import Registry

OPTIMIZERS = Registry("optimizer")
LR_SCHEDULERS = Registry("lr_scheduler")
