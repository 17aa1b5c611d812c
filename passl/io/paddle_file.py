"""Reading ``paddle.save`` files (weights, checkpoints) without running code from them.

``paddle.load`` unpickles without restriction, so a ``.pdparams`` passed to ``--pretrained``
could run any callable it names. :func:`load_paddle_file` reads the same pickle with
:func:`passl.io.safe_pickle.restricted_load`, whose vocabulary (:data:`PADDLE_SAVE`) holds
only what ``paddle.save`` writes for state dicts and checkpoints, each made by a function here
from values it checks first:

- NumPy arrays and scalars of plain numeric dtypes (bool, signed and unsigned integers,
  float16/32/64; Paddle stores bfloat16 as uint16), whose bytes are exactly shape x itemsize;
  no object, structured, sub-array, string, void or datetime dtype can be made;
- ``OrderedDict`` (without attributes), ``tuple``, ``bytes`` (``_codecs.encode`` in
  protocol-2 pickles);
- ``GeneratorState`` (``paddle.get_rng_state()`` in checkpoints), only from a state whose
  numbers have the shape of Paddle's Mersenne-Twister state.

The result is then converted exactly as ``paddle.load`` does:

- ``paddle.save`` of a pure state dict (``{name: Tensor}``) stores NumPy arrays plus a
  ``StructuredToParameterName@@`` name table; ``paddle.load`` turns each array back into a
  Tensor carrying its saved name and drops the table.
- any other object (a training checkpoint) stores each Tensor as ``tuple((name, array))``,
  hence the ``builtins.tuple`` global; ``paddle.load`` turns every ``(str, ndarray)`` pair into
  a named Tensor (or, when the file has none, every array into a Tensor).

``trust=True`` (the ``--trust-file`` flag) hands the file to ``paddle.load`` instead, after a
warning on stderr: the escape hatch for a legacy file that needs another global.
"""
import collections
import math
import sys

import numpy as np
import paddle
from paddle.base.core import GeneratorState
from paddle.framework.io import _ndarray_to_tensor, _pack_loaded_dict, _tuple_to_tensor

from passl.errors import UserError
from passl.io.input_file import open_regular_file
from passl.io.safe_pickle import (Constructor, MalformedFileError, Marker, Pending,
                                  TruncatedFileError, UnsafeFileError, Vocabulary, finish,
                                  printable, restricted_load)

TRUST_FLAG = "--trust-file"
# paddle.save writes this key into a pure state dict: {key: the Tensor's name}.
_NAME_TABLE = "StructuredToParameterName@@"
# and this one when it split big tensors (pickle protocols 2-3): {key: {OriginShape, slices}}.
_SPLIT_TABLE = "UnpackBigParamInfor@@"  # typos: disable-line
#: The dtypes an array in a file may have (NumPy's names as pickled).
NUMERIC_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
_NDARRAY = Marker("numpy.ndarray")  # only an argument of _reconstruct


def _is(value, *choices):
    """``value`` equals one of ``choices`` and has its exact type (no file-made ``__eq__``)."""
    return any(type(value) is type(choice) and value == choice for choice in choices)


def _is_int(value, low=None, high=None):
    return (type(value) is int and (low is None or value >= low)
            and (high is None or value < high))


class _Dtype(Pending):
    """``numpy.dtype(name, align, copy)`` and its ``BUILD`` state, checked field by field."""

    def __init__(self, name):
        self.name, self.dtype = name, None

    def build(self, machine, state):
        if self.dtype is not None:
            raise MalformedFileError("a dtype built twice")
        if not (type(state) is tuple and len(state) in (8, 9) and _is(state[0], 3, 4)
                and all(field is None for field in state[2:5] + state[8:])
                and all(_is(field, want) for field, want in zip(state[5:8], (-1, -1, 0)))):
            raise MalformedFileError(f"a dtype {self.name} with fields, sub-arrays or flags "
                                     f"(state {state!r:.80}); weights are plain numbers")
        dtype = np.dtype(self.name)
        order = state[1]
        if not (_is(order, "<", "=") or (_is(order, "|") and dtype.itemsize == 1)):
            raise MalformedFileError(f"a dtype {self.name} with byte order {order!r:.20} "
                                     f"(paddle.save writes little-endian arrays)")
        self.dtype = dtype.newbyteorder("<")

    def value(self):
        raise MalformedFileError("a dtype where data belongs")


def _dtype(machine, name, align, copy):
    if not _is(name, *NUMERIC_DTYPES):
        kind = "Python objects" if type(name) is str and name.startswith("O") else "non-numbers"
        raise UnsafeFileError(f"the file holds an array of {kind} (dtype {name!r:.20}); "
                              f"weights are plain numbers ({', '.join(NUMERIC_DTYPES)})")
    if not (_is(align, False, 0) and _is(copy, True, 1)):
        raise MalformedFileError(f"a dtype {name} with options {align!r:.20}, {copy!r:.20}")
    return _Dtype(name)


def _built_dtype(dtype):
    if not isinstance(dtype, _Dtype) or dtype.dtype is None:
        raise MalformedFileError(f"an array whose dtype is {type(dtype).__name__}, not a "
                                 f"complete numeric dtype")
    return dtype.dtype


def _array_from(machine, shape, dtype, data, order="C"):
    """A writable array of ``shape`` and ``dtype`` holding exactly the bytes ``data``."""
    if not (type(shape) is tuple and len(shape) <= 32 and all(_is_int(n, 0) for n in shape)):
        raise MalformedFileError(f"an array of shape {shape!r:.60}")
    if type(data) is not bytes:
        raise MalformedFileError(f"array data of type {type(data).__name__}, not bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise MalformedFileError(f"an array of shape {list(shape)} and dtype {dtype} needs "
                                 f"{math.prod(shape) * dtype.itemsize:,} bytes, the file "
                                 f"gives {len(data):,}")
    if dtype.kind == "b" and data.translate(None, b"\x00\x01"):
        raise MalformedFileError("a bool array holding bytes other than 0 and 1")
    machine.charge(len(data))
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy(order="K")


class _Array(Pending):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` then ``BUILD`` with
    ``(1, shape, dtype, is_fortran, bytes)``: the array made from those checked values."""

    def __init__(self):
        self.array = None

    def build(self, machine, state):
        if self.array is not None:
            raise MalformedFileError("an array built twice")
        if not (type(state) is tuple and len(state) == 5 and _is(state[0], 1)
                and type(state[3]) is bool):
            raise MalformedFileError(f"an array state {state!r:.60}")
        _, shape, dtype, fortran, data = state
        self.array = _array_from(machine, shape, _built_dtype(dtype), data,
                                 "F" if fortran else "C")
        self.weight = self.array.nbytes + 1

    def value(self):
        if self.array is None:
            raise MalformedFileError("an array without data (no BUILD)")
        return self.array


def _reconstruct(machine, cls, shape, typecode):
    if cls is not _NDARRAY or not _is(typecode, b"b", "b") or type(shape) is not tuple:
        raise MalformedFileError("_reconstruct of something other than an empty ndarray")
    return _Array()


def _scalar(machine, dtype, data):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: a NumPy number (np.float32(1.5))."""
    return _array_from(machine, (), _built_dtype(dtype), data)[()]


def _encode(machine, text, encoding):
    """``_codecs.encode(str, 'latin1')``: how protocol-2 pickles store bytes."""
    if type(text) is not str or not _is(encoding, "latin1", "latin-1"):
        raise MalformedFileError("_codecs.encode of something other than latin-1 text")
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        raise MalformedFileError("_codecs.encode of text that is not latin-1") from None


def _tuple(machine, items):
    if type(items) not in (list, tuple):
        raise MalformedFileError(f"tuple() of a {type(items).__name__}")
    return tuple(items)


def _ordered_dict(machine):
    return collections.OrderedDict()


#: Paddle's CPU generator is a std::mt19937_64: 312 words and a position, as decimal text.
_MT_WORDS = 312


def check_generator_state(state):
    """Raise MalformedFileError unless ``state`` is ``(device, seed, offset, engine)`` as
    ``GeneratorState.__getstate__`` returns it; ``engine`` lists the character codes of the
    Mersenne-Twister text (312 numbers below 2**64, then a position of at most 312)."""
    if not (type(state) is tuple and len(state) == 4 and _is_int(state[0], -1, 1 << 16)
            and _is_int(state[1], 0, 1 << 64) and _is_int(state[2], 0, 1 << 64)
            and type(state[3]) is list and len(state[3]) <= (_MT_WORDS + 1) * 21
            and all(_is_int(c, 32, 58) for c in state[3])):
        raise MalformedFileError(f"a random generator state of the wrong form "
                                 f"({str(state)[:60]})")
    words = bytes(state[3]).decode("ascii").split(" ")
    if not (len(words) == _MT_WORDS + 1 and all(w.isdigit() and len(w) <= 20 for w in words)
            and all(int(w) < 1 << 64 for w in words) and int(words[-1]) <= _MT_WORDS):
        raise MalformedFileError(f"a random generator state with {len(words)} numbers, "
                                 f"not {_MT_WORDS} and a position")


class _GeneratorState(Pending):
    """``GeneratorState`` via ``NEWOBJ``; the native object is made only once ``BUILD``
    has brought a state that :func:`check_generator_state` accepts."""

    def __init__(self):
        self.state = None

    def build(self, machine, state):
        if self.state is not None:
            raise MalformedFileError("a random generator state built twice")
        check_generator_state(state)
        self.state = state

    def value(self):
        if self.state is None:
            raise MalformedFileError("a random generator state without its numbers (no BUILD)")
        generator = GeneratorState.__new__(GeneratorState)
        generator.__setstate__(self.state)
        return generator


def _generator_state(machine):
    return _GeneratorState()


def _paddle_save_globals():
    """``{(module, name): Constructor or Marker}``: every global ``paddle.save`` writes."""
    allowed = {
        ("collections", "OrderedDict"): Constructor("collections.OrderedDict", _ordered_dict),
        ("builtins", "tuple"): Constructor("tuple", _tuple),  # a Tensor: tuple((name, array))
        ("__builtin__", "tuple"): Constructor("tuple", _tuple),  # the same in protocol 2
        ("_codecs", "encode"): Constructor("_codecs.encode", _encode),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): Constructor("numpy.dtype", _dtype),
        ("paddle.base.libpaddle", "GeneratorState"):
            Constructor("GeneratorState", new=_generator_state),
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1.x, 2.x
        allowed[(module, "_reconstruct")] = Constructor("numpy _reconstruct", _reconstruct)
        allowed[(module, "scalar")] = Constructor("numpy scalar", _scalar)
    return allowed


#: What a ``paddle.save`` file may contain.
PADDLE_SAVE = Vocabulary(_paddle_save_globals(),
                         leaves=(np.ndarray, np.bool_, np.number, GeneratorState))


def _join_split_tensors(obj):
    """``_pack_loaded_dict`` after checking that its table joins arrays of this dict, each
    part used once, into the shape it names (so joining makes no more than the file holds)."""
    table = obj.get(_SPLIT_TABLE)
    if table is None:
        return obj
    used = set()
    for key, info in table.items() if isinstance(table, dict) else [(None, None)]:
        parts = info.get("slices") if isinstance(info, dict) else None
        shape = info.get("OriginShape") if isinstance(info, dict) else None
        if not (isinstance(parts, list) and isinstance(shape, (list, tuple))
                and all(_is_int(n, 0) for n in shape) and parts
                and all(isinstance(p, str) and isinstance(obj.get(p), np.ndarray)
                        and obj[p].ndim == 1 and p not in used and not used.add(p)
                        for p in parts)
                and len({obj[p].dtype for p in parts}) == 1
                and sum(obj[p].size for p in parts) == math.prod(shape)):
            raise MalformedFileError(f"a table of split tensors ({_SPLIT_TABLE}) that does not "
                                     f"match the arrays in the file")
    return _pack_loaded_dict(obj)


def _named_tensors(obj):
    """A pure state dict: the arrays listed in the name table become Tensors of that name."""
    table = obj.pop(_NAME_TABLE)
    if not (isinstance(table, dict) and all(isinstance(name, str) and key in obj
                                            for key, name in table.items())):
        raise MalformedFileError(f"a name table ({_NAME_TABLE}) naming keys the file lacks")
    for key, name in table.items():
        if isinstance(obj[key], np.ndarray):
            obj[key] = _ndarray_to_tensor(obj[key], return_numpy=False)
            obj[key].name = name
    return obj


def _is_named_array(x):
    return type(x) is tuple and len(x) == 2 and isinstance(x[0], str) \
        and isinstance(x[1], np.ndarray)


def _contains_named_array(obj):
    pending, seen = [obj], set()
    while pending:
        x = pending.pop()
        if _is_named_array(x):
            return True
        if id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) in (dict, collections.OrderedDict):
            pending.extend(x.values())
        elif type(x) in (list, tuple):
            pending.extend(x)
    return False


def _as_paddle_load_returns(obj):
    """What ``paddle.load`` makes of the unpickled ``obj`` (dygraph mode, Tensors, not NumPy);
    the branches of ``paddle.framework.io.load`` after its ``pickle.load``."""
    if isinstance(obj, dict):
        obj = _join_split_tensors(obj)
        if _NAME_TABLE in obj:
            return _named_tensors(obj)
    if _contains_named_array(obj):  # Tensors saved as (name, array): only those convert
        def convert(x):
            return _tuple_to_tensor(x, return_numpy=False) \
                if _is_named_array(x) and _fits_tensor(x[1]) else None
    else:
        def convert(x):
            return _ndarray_to_tensor(x, return_numpy=False) \
                if isinstance(x, np.ndarray) and _fits_tensor(x) else None
    return finish(obj, PADDLE_SAVE.leaves, convert)


def _fits_tensor(array):
    """True, or the one-line error ``paddle.to_tensor`` would raise as a traceback."""
    if array.dtype.str[1:] in ("u4", "u8"):
        raise MalformedFileError(f"an array of dtype {array.dtype} where paddle.load makes a "
                                 f"Tensor, which cannot hold it")
    return True


def check_state_dict(state, where):
    """Raise a one-line UserError unless ``state`` is a ``{name: Tensor}`` state dict; ``where``
    names it (e.g. ``"weights w.pdparams"``). What a model's ``set_state_dict`` can take."""
    if not isinstance(state, dict):
        raise UserError(f"{where}: expected a {{name: tensor}} state dict, found a "
                        f"{type(state).__name__}")
    wrong = [f"{printable(name)} ({type(value).__name__})" for name, value in state.items()
             if not (isinstance(name, str) and isinstance(value, paddle.Tensor))]
    if wrong:
        raise UserError(f"{where}: a state dict holds tensors by name; these entries are not: "
                        f"{', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}")
    return state


def _read(path, what):
    file, size = open_regular_file(path, f"{what} {path}")
    with file:
        return _as_paddle_load_returns(restricted_load(file, size, PADDLE_SAVE, "latin1"))


def load_paddle_file(path, what, trust=False):
    """The object in the ``paddle.save`` file ``path``, equal to what ``paddle.load`` returns.

    Args:
        what: how errors name the file's origin, e.g. ``"--pretrained"`` or ``"checkpoint"``.
        trust: use ``paddle.load`` itself (runs code from the file) after a warning on stderr.

    Raises:
        UnsafeFileError: the pickle names a global outside :data:`PADDLE_SAVE` (nothing it
            names has been called).
        UserError: no such file, not a regular file, or not a well-formed ``paddle.save``
            pickle (one line saying what is wrong).
    """
    hint = (f"; if you trust where the file comes from, {TRUST_FLAG} loads it with "
            f"paddle.load, which runs whatever code it contains")
    if trust:
        open_regular_file(path, f"{what} {path}")[0].close()
        print(f"warning: {TRUST_FLAG}: {what} {path} is loaded with paddle.load, which runs any "
              f"code the file contains; use it only for files from a source you trust",
              file=sys.stderr)
        try:
            return paddle.load(path)
        except Exception as e:  # paddle.load raises many types for other files
            raise UserError(f"{what} {path}: not a file written by paddle.save "
                            f"({type(e).__name__})") from None
    try:
        return _read(path, what)
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{what} {path}: refused to load: {e}{hint}") from None
    except TruncatedFileError:
        raise UserError(f"{what} {path}: the file ends early (an incomplete copy or "
                        f"download?); copy it again") from None
    except MalformedFileError as e:
        raise UserError(f"{what} {path}: not a file written by paddle.save ({e})") from None
