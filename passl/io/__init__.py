"""File formats the toolkit reads and writes: checkpoints, weights, metrics.jsonl, exports,
shards, PyTorch files.

Modules here import only ``passl.errors`` and each other, so every other layer (data,
models, evaluation, the engine, the tools) can depend on them without import cycles
(docs/internals.md, "Layers").
"""
