"""File formats the toolkit reads and writes, below every other layer.

Modules here import nothing from ``passl.engine`` or ``passl.models``, so the engine,
the models and the tools can all depend on them without import cycles.
"""
