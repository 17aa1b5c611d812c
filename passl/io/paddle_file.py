"""Reading ``paddle.save`` files (weights, checkpoints) without running code from them.

``paddle.load`` unpickles without restriction, so a ``.pdparams`` passed to ``--pretrained``
could run any callable it names. :func:`load_paddle_file` reads the same pickle with
:class:`~passl.io.safe_pickle.RestrictedUnpickler`, allowing only the globals that
``paddle.save`` writes for state dicts and checkpoints (found by unpickling real files with a
recording ``find_class``), then converts the result exactly as ``paddle.load`` does:

- ``paddle.save`` of a pure state dict (``{name: Tensor}``) stores NumPy arrays plus a
  ``StructuredToParameterName@@`` name table; ``paddle.load`` turns each array back into a
  Tensor carrying its saved name and drops the table.
- any other object (a training checkpoint) stores each Tensor as ``tuple((name, array))``,
  hence the ``builtins.tuple`` global; ``paddle.load`` turns every ``(str, ndarray)`` pair into
  a named Tensor (or, when the file has none, every array into a Tensor).

``trust=True`` (the ``--trust-file`` flag) hands the file to ``paddle.load`` instead, after a
warning on stderr: the escape hatch for a legacy file that needs another global.
"""
import codecs
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import paddle
from paddle.base.core import GeneratorState
from paddle.framework.io import _ndarray_to_tensor, _pack_loaded_dict, _parse_load_result

from passl.errors import UserError
from passl.io.safe_pickle import RestrictedUnpickler, UnsafeFileError

TRUST_FLAG = "--trust-file"
# paddle.save writes this key into a pure state dict: {key: the Tensor's name}.
_NAME_TABLE = "StructuredToParameterName@@"


def _numeric_dtype(*args):
    """``numpy.dtype`` for the allow-list: an object dtype would let an array's pickled
    state carry arbitrary objects, so it is refused like a foreign global."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafeFileError(f"the file holds an array of Python objects (dtype {dtype}); "
                              f"weights are numbers")
    return dtype


def _paddle_save_globals():
    """``{(module, name): object}``: every global ``paddle.save`` writes for our files."""
    rebuild_array = np.empty(0).__reduce__()[0]    # numpy's _reconstruct
    rebuild_scalar = np.float32(0).__reduce__()[0]  # numpy's scalar (np.float32(1.5) etc.)
    allowed = {
        ("collections", "OrderedDict"): OrderedDict,  # Layer.state_dict()
        ("builtins", "tuple"): tuple,                 # a Tensor is pickled as tuple((name, array))
        ("__builtin__", "tuple"): tuple,              # the same in a protocol-2 pickle
        ("_codecs", "encode"): codecs.encode,         # bytes (array data) in a protocol-2 pickle
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _numeric_dtype,
        # paddle.get_rng_state() in checkpoints; built from integers by its __setstate__
        ("paddle.base.libpaddle", "GeneratorState"): GeneratorState,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1.x, 2.x
        allowed[(module, "_reconstruct")] = rebuild_array
        allowed[(module, "scalar")] = rebuild_scalar
    return allowed


PADDLE_SAVE_GLOBALS = _paddle_save_globals()


def _as_paddle_load_returns(obj):
    """What ``paddle.load`` makes of the unpickled ``obj`` (dygraph mode, Tensors, not NumPy);
    the branches of ``paddle.framework.io.load`` after its ``pickle.load``."""
    if not isinstance(obj, dict):
        return _parse_load_result(obj, return_numpy=False)
    obj = _pack_loaded_dict(obj)  # re-joins tensors split for protocols 2-3
    if _NAME_TABLE not in obj:
        return _parse_load_result(obj, return_numpy=False)
    for key, name in obj.pop(_NAME_TABLE).items():
        if isinstance(obj[key], np.ndarray):
            obj[key] = _ndarray_to_tensor(obj[key], return_numpy=False)
            obj[key].name = name
    return obj


def _read(path, what):
    hint = (f"; if you trust where the file comes from, {TRUST_FLAG} loads it with "
            f"paddle.load, which runs whatever code it contains")
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f, PADDLE_SAVE_GLOBALS, f"{what} {path}", hint,
                                        encoding="latin1")
        try:
            return _as_paddle_load_returns(unpickler.load())
        except UnsafeFileError as e:
            if str(e).startswith(f"{what} {path}"):
                raise
            raise UnsafeFileError(f"{what} {path}: refused to load: {e}{hint}") from None


def load_paddle_file(path, what, trust=False):
    """The object in the ``paddle.save`` file ``path``, equal to what ``paddle.load`` returns.

    Args:
        what: how errors name the file's origin, e.g. ``"--pretrained"`` or ``"checkpoint"``.
        trust: use ``paddle.load`` itself (runs code from the file) after a warning on stderr.

    Raises:
        UnsafeFileError: the pickle names a global outside :data:`PADDLE_SAVE_GLOBALS` (nothing
            it names has been called).
        UserError: no such file, or not a readable ``paddle.save`` pickle.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: file not found")
    if trust:
        print(f"warning: {TRUST_FLAG}: {what} {path} is loaded with paddle.load, which runs any "
              f"code the file contains; use it only for files from a source you trust",
              file=sys.stderr)
    try:
        return paddle.load(path) if trust else _read(path, what)
    except UnsafeFileError:
        raise
    except Exception as e:  # unpickling and paddle.load raise many types for other files
        if isinstance(e, EOFError) or (isinstance(e, pickle.UnpicklingError)
                                       and "truncated" in str(e)):
            raise UserError(f"{what} {path}: the file ends early (an incomplete copy or "
                            f"download?); copy it again") from None
        raise UserError(f"{what} {path}: not a file written by paddle.save "
                        f"({type(e).__name__})") from None
