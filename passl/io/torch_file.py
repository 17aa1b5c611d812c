"""PyTorch checkpoints (``.pth``, ``.pth.tar``) read into NumPy arrays, without importing torch.

``torch.save`` writes one of two layouts, and the published SwAV files use both over time:

* the legacy stream (PyTorch < 1.6; facebookresearch/swav's model zoo was saved with 1.4):
  five pickles one after the other (magic number, protocol version, system info, the object,
  the sorted list of storage keys), then every storage's bytes, each behind an 8-byte
  little-endian element count, in the order of that list;
* the zip archive (PyTorch >= 1.6): ``<root>/data.pkl`` holds the object, ``<root>/data/<key>``
  each storage's raw bytes, ``<root>/byteorder`` (absent in old archives: little-endian).

In both, the object pickle names a storage by a persistent id
``('storage', <storage type>, key, location, element count[, view])`` and builds every
tensor with ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
The unpickler here (:class:`~passl.io.safe_pickle.RestrictedUnpickler`) resolves exactly
those globals, plus the containers a state dict needs, to local stand-ins that build NumPy
arrays; any other global is refused before anything from the file runs.
"""
import collections
import io
import math
import struct
import zipfile
import zlib

import numpy as np

from passl.errors import UserError
from passl.io.input_file import open_regular_file
from passl.io.safe_pickle import (MAX_DEPTH, Constructor, MalformedFileError, Marker,
                                  TruncatedFileError, UnsafeFileError, Vocabulary, budget_for,
                                  finish, printable, restricted_load)

#: The first pickle of a legacy file (torch/serialization.py's MAGIC_NUMBER).
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
#: Storage types -> NumPy dtypes: weights are float16/32/64, BatchNorm counters int64.
STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
#: Storage types a file may name that NumPy has no dtype for: a clear error, not "unsafe".
UNSUPPORTED_STORAGES = ("BFloat16Storage", "ComplexFloatStorage", "ComplexDoubleStorage")
ZIP_MAGIC = b"PK\x03\x04"
#: The longest zip entry read besides data.pkl and storages (``byteorder``).
SMALL_ENTRY = 64


class _StorageType(Marker):
    """Stands in for ``torch.FloatStorage`` and friends: an inert marker naming a dtype; the
    file can neither call it nor ``BUILD`` on it."""

    def __init__(self, name):
        super().__init__(f"torch.{name}")
        self.storage_name = name
        self.dtype = STORAGE_DTYPES.get(name)


class _Storage:
    """A storage named by the pickle; its bytes arrive later (legacy) or on demand (zip)."""

    def __init__(self, dtype, numel):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.array = None  # 1-D array of ``numel`` elements once read


class _StorageView:
    """A pre-0.4 storage view: ``numel`` elements of ``root`` from ``offset``."""

    def __init__(self, root, offset, numel):
        self.root, self.offset, self.numel = root, offset, numel
        self.dtype = root.dtype

    @property
    def array(self):
        if self.root.array is None:
            return None
        return self.root.array[self.offset:self.offset + self.numel]


def _is_count(value):
    return type(value) is int and value >= 0


class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it; made an array once storages are read.

    Its extent was checked against its storage when it was described, and its bytes were
    counted against the file's budget, so making it allocates no more than the file allows.
    """

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def to_array(self, what):
        data = self.storage.array
        if data is None:
            raise UserError(f"{what}: corrupt PyTorch checkpoint (a tensor's storage has no "
                            f"data in the file); download it again")
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=self.storage.dtype)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=[s * data.itemsize for s in self.stride], writeable=False)
        return np.array(view)  # a copy: views of one storage become independent arrays


def _rebuild_tensor_v2(machine, storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Check a tensor's description before anything is allocated for it: sizes and strides
    non-negative, the last element inside its storage, its bytes within the file's budget
    (which refuses stride-0 expansions and many views of one storage beyond that)."""
    if not isinstance(storage, (_Storage, _StorageView)):
        raise MalformedFileError(f"a tensor whose storage is {type(storage).__name__}")
    if not (_is_count(offset) and type(size) is tuple and type(stride) is tuple
            and len(size) == len(stride) <= MAX_DEPTH
            and all(_is_count(n) for n in size + stride)):
        raise MalformedFileError(f"a tensor with offset {offset!r:.20}, size {size!r:.40}, "
                                 f"stride {stride!r:.40}")
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise MalformedFileError(f"a tensor of shape {list(size)} reaching past its storage "
                                     f"of {storage.numel} elements")
    machine.charge(numel * storage.dtype.itemsize)
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(machine, data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise MalformedFileError(f"a parameter made of a {type(data).__name__}")
    return data


def _ordered_dict(machine):
    return collections.OrderedDict()


def _ordered_dict_state(state):
    """``BUILD`` on a state dict: PyTorch pickles its ``_metadata`` attribute (module
    versions), which a converter does not need; any other attribute is refused."""
    if not (type(state) is dict and set(state) <= {"_metadata"}):
        raise MalformedFileError("BUILD on an OrderedDict with attributes other than "
                                 "_metadata")


TORCH_SAVE = Vocabulary(
    {**{("torch", name): _StorageType(name) for name in (*STORAGE_DTYPES, *UNSUPPORTED_STORAGES)},
     ("collections", "OrderedDict"): Constructor("collections.OrderedDict", _ordered_dict),
     ("torch._utils", "_rebuild_tensor_v2"): Constructor("_rebuild_tensor_v2", _rebuild_tensor_v2),
     ("torch._utils", "_rebuild_parameter"): Constructor("_rebuild_parameter", _rebuild_parameter)},
    ordered_dict_state=_ordered_dict_state, leaves=(_TensorRef,))
#: The legacy format's header pickles and storage list: plain values only.
PLAIN = Vocabulary({})


def _check_storage_type(storage_type, what):
    if not isinstance(storage_type, _StorageType):
        raise UserError(f"{what}: not a PyTorch checkpoint (a storage of type "
                        f"{type(storage_type).__name__})")
    if storage_type.dtype is None:
        raise UserError(f"{what}: a {storage_type.storage_name} tensor, which NumPy cannot hold; "
                        f"convert it to float32 in PyTorch first (tensor.float())")
    return storage_type


class _PersistentStorages:
    """``persistent_load`` for both layouts: one :class:`_Storage` per key, shared by views.

    The storages a file declares may hold at most ``budget`` bytes in all, checked as each
    is named, before any is read.
    """

    def __init__(self, what, budget):
        self.what, self.budget = what, budget
        self.declared = 0
        self.by_key = {}

    def __call__(self, pid):
        if not (type(pid) is tuple and len(pid) in (5, 6) and type(pid[0]) is str
                and pid[0] == "storage"
                and type(pid[2]) is str and _is_count(pid[4])):
            raise MalformedFileError(f"an unexpected persistent id {pid!r:.60}")
        storage_type = _check_storage_type(pid[1], self.what)
        key, numel = pid[2], pid[4]
        if key not in self.by_key:
            self.declared += numel * np.dtype(storage_type.dtype).itemsize
            if self.declared > self.budget:
                raise MalformedFileError(f"storages of {self.declared:,} bytes in a file of "
                                         f"{self.budget:,} bytes at most")
            self.by_key[key] = _Storage(storage_type.dtype, numel)
        root = self.by_key[key]
        if not isinstance(root, _Storage) or root.dtype != storage_type.dtype:
            raise MalformedFileError(f"storage {printable(key)} named twice with different types")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str
                and _is_count(view[1]) and _is_count(view[2])
                and view[1] + view[2] <= root.numel and view[0] not in (key,)):
            raise MalformedFileError(f"a storage view {view!r:.60} outside its storage")
        view_key, offset, view_numel = view
        if view_key not in self.by_key:
            self.by_key[view_key] = _StorageView(root, offset, view_numel)
        if not isinstance(self.by_key[view_key], _StorageView):
            raise MalformedFileError(f"storage {printable(view_key)} is both a storage and a view")
        return self.by_key[view_key]


def _load_object(file, size, storages):
    return restricted_load(file, size, TORCH_SAVE, "utf-8", storages, budget=storages.budget)


def _remaining(file, size):
    return size - file.tell()


def _read_legacy(file, size, what, budget):
    try:
        magic = restricted_load(file, size, PLAIN)
    except (UnsafeFileError, MalformedFileError):  # a pickle of something else
        magic = None
    if not (type(magic) is int and magic == LEGACY_MAGIC):
        raise UserError(f"{what}: not a PyTorch checkpoint (a pickle without PyTorch's magic "
                        f"number; paddle.save files load with --pretrained or --load)")
    header = [restricted_load(file, _remaining(file, size), PLAIN) for _ in range(2)]
    if not isinstance(header[1], dict) or header[1].get("little_endian", True) is not True:
        raise UserError(f"{what}: a big-endian PyTorch file; re-save it on a little-endian "
                        f"machine")
    storages = _PersistentStorages(what, budget)
    obj = _load_object(file, _remaining(file, size), storages)
    keys = restricted_load(file, _remaining(file, size), PLAIN)
    if type(keys) is not list:
        raise MalformedFileError("no list of storages after the object")
    for key in keys:
        storage = storages.by_key.get(key) if type(key) is str else None
        if not isinstance(storage, _Storage) or storage.array is not None:
            raise UserError(f"{what}: corrupt PyTorch checkpoint (storage {key!r:.40} is "
                            f"listed twice or never used)")
        count = file.read(8)
        if len(count) < 8:
            raise TruncatedFileError("the file ends inside the storages")
        listed = struct.unpack("<q", count)[0]
        if listed != storage.numel:
            raise MalformedFileError(f"storage {printable(key)} holds {listed} elements, the "
                                     f"object says {storage.numel}")
        nbytes = storage.numel * storage.dtype.itemsize
        if nbytes > _remaining(file, size):
            raise TruncatedFileError("the file ends inside the storages")
        storage.array = np.frombuffer(file.read(nbytes), dtype=storage.dtype.newbyteorder("<")
                                      ).astype(storage.dtype, copy=False)
    return obj


def _entry(archive, name, what, limit):
    """The bytes of zip entry ``name``, at most ``limit``; refuses what PyTorch never writes
    (encryption, compression other than stored/deflated) and entries larger than ``limit``."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise UserError(f"{what}: corrupt PyTorch checkpoint (no entry {printable(name)}); "
                        f"download it again") from None
    label = f"the zip entry {printable(name)}"
    if info.flag_bits & 0x1:
        raise UserError(f"{what}: {label} is encrypted, which PyTorch never writes; decrypt "
                        f"the archive first")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserError(f"{what}: {label} uses compression method {info.compress_type}, which "
                        f"PyTorch never writes; re-save the file with torch.save")
    if info.file_size > limit:
        raise MalformedFileError(f"{label} holds {info.file_size:,} bytes, more than the "
                                 f"{limit:,} it may")
    with archive.open(info) as entry:
        return entry.read(limit)


def _read_zip(file, what, budget):
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"{what}: a zip file but not a PyTorch checkpoint (no data.pkl)")
        root = pickles[0][:-len("data.pkl")]
        order = "<"
        if root + "byteorder" in names:
            order = "<" if _entry(archive, root + "byteorder", what,
                                  SMALL_ENTRY).strip() == b"little" else ">"
        storages = _PersistentStorages(what, budget)
        data = _entry(archive, pickles[0], what, budget)
        obj = _load_object(io.BytesIO(data), len(data), storages)
        for key, storage in storages.by_key.items():
            if isinstance(storage, _StorageView):
                continue
            nbytes = storage.numel * storage.dtype.itemsize
            data = _entry(archive, f"{root}data/{key}", what, nbytes)
            if len(data) < nbytes:
                raise TruncatedFileError(f"storage {printable(key)} has {len(data)} of its "
                                         f"{nbytes} bytes")
            storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder(order),
                                          count=storage.numel).astype(storage.dtype,
                                                                      copy=False)
    return obj


#: What the zip module raises for archives it cannot read (broken, or features it lacks;
#: OSError: a seek to the negative offset a damaged header gives).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, struct.error, NotImplementedError,
              RuntimeError, ValueError, OverflowError, OSError)


def read_torch_file(path, what=None):
    """The object ``torch.save`` wrote to ``path``, every tensor as a NumPy array.

    Args:
        path: a ``.pth``/``.pth.tar`` file in the legacy or the zip layout.
        what: how errors name the file (default: the path).

    Raises:
        UserError: not a PyTorch checkpoint, truncated, corrupt or built to attack, a
            dtype NumPy lacks (bfloat16, complex); one line naming the file.
        UnsafeFileError: the file asks for a global a checkpoint does not need.
    """
    what = what or path
    file, size = open_regular_file(path, what)
    budget = budget_for(size)
    try:
        with file:
            start = file.read(4)
            file.seek(0)
            if start == ZIP_MAGIC:
                try:
                    obj = _read_zip(file, what, budget)
                except ZIP_ERRORS as error:
                    raise UserError(f"{what}: truncated or not a PyTorch checkpoint "
                                    f"({type(error).__name__}); download it again") from None
            elif start[:1] == b"\x80":
                obj = _read_legacy(file, size, what, budget)
            else:
                raise UserError(f"{what}: not a PyTorch checkpoint (neither a zip archive nor "
                                f"a pickle stream)")
    except UnsafeFileError as error:
        raise UnsafeFileError(f"{what}: refused to load: {error}") from None
    except TruncatedFileError:
        raise UserError(f"{what}: truncated or not a PyTorch checkpoint (the file ends early); "
                        f"download it again") from None
    except MalformedFileError as error:
        raise UserError(f"{what}: not a valid PyTorch checkpoint ({error})") from None
    return finish(obj, convert=lambda x: x.to_array(what) if isinstance(x, _TensorRef) else None)


def torch_state_dict(obj, what):
    """The flat ``{name: array}`` state dict inside a loaded checkpoint.

    Unwraps the training scripts' conventions: a dict holding it under ``state_dict``
    (facebookresearch/swav's ``checkpoint.pth.tar`` and eval_linear files) or ``model``, and
    the ``module.`` prefix that ``DistributedDataParallel`` puts before every name.
    """
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{what}: no state dict in this PyTorch file (holds a "
                        f"{type(obj).__name__}); expected {{name: tensor}}, possibly under "
                        f"'state_dict' or 'model'")
    not_tensors = [printable(name) for name, value in obj.items()
                   if not (isinstance(name, str) and isinstance(value, np.ndarray))]
    if not_tensors:
        raise UserError(f"{what}: the state dict holds non-tensor entries "
                        f"({', '.join(not_tensors[:3])}); expected {{name: tensor}}")
    prefix = "module."
    return collections.OrderedDict(
        (name[len(prefix):] if name.startswith(prefix) else name, value)
        for name, value in obj.items())
