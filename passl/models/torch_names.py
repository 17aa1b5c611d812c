"""PyTorch's layer conventions in Paddle's: what every converted tensor goes through.

Each model file maps the names of the PyTorch model it mirrors onto its own (timm's
``checkpoint_filter_fn`` pattern); the conventions that differ between the two frameworks
for the same layer live here, once.
"""
import re

import numpy as np

#: BatchNorm statistics: PyTorch's buffer names -> Paddle's.
BATCHNORM_BUFFERS = {"running_mean": "_mean", "running_var": "_variance"}
#: PyTorch's BatchNorm counts its updates (used only with momentum=None); Paddle keeps no counter.
DROPPED_BUFFER = "num_batches_tracked"
#: The tensor kinds a converted layer can hold: parameters and BatchNorm statistics.
LEAF = r"(weight|bias|running_mean|running_var)"


def paddle_leaf(name):
    """``name`` with a BatchNorm buffer renamed (``bn1.running_var`` -> ``bn1._variance``)."""
    layer, _, leaf = name.rpartition(".")
    return f"{layer}.{BATCHNORM_BUFFERS.get(leaf, leaf)}" if layer else name


def rename_exact(pattern, replacement, name):
    """``replacement`` with the groups of ``pattern`` when it matches all of ``name``, else None
    (leaf names as they are: what files already in Paddle's layout, PASSL v1's, need)."""
    match = re.fullmatch(pattern, name)
    return match.expand(replacement) if match else None


def rename(pattern, replacement, name):
    """:func:`rename_exact`, then PyTorch's BatchNorm buffer names made Paddle's."""
    renamed = rename_exact(pattern, replacement, name)
    return paddle_leaf(renamed) if renamed else None


def paddle_layout(array):
    """A PyTorch tensor as Paddle stores it, in float32 for floating point.

    ``nn.Linear`` keeps its weight as ``[out, in]`` in PyTorch and ``[in, out]`` in Paddle, so
    every 2-D tensor is transposed: in the ResNets and SwAV heads converted here the only
    2-D tensors are Linear weights (convolutions are 4-D, BatchNorm and biases 1-D).
    float16/float64 become float32, the models' dtype (float16 -> float32 is exact).
    """
    if array.ndim == 2:
        array = array.T
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)
