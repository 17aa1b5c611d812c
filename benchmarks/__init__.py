"""Benchmarks run by ``tools/benchmark.py <name>``.

Each module has ``add_arguments(parser)`` and ``main(args)``.
"""
