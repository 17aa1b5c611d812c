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
import pickle
import struct
import zipfile

import numpy as np

from passl.errors import UserError
from passl.io.safe_pickle import RestrictedUnpickler, UnsafeFileError

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


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only the dtype matters here."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES.get(name)


class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it; made an array once storages are read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def to_array(self, what):
        data = self.storage.array
        if data is None:
            raise UserError(f"{what}: corrupt PyTorch checkpoint (a tensor's storage has no "
                            f"data in the file); download it again")
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=self.storage.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= data.size:
            raise UserError(f"{what}: corrupt PyTorch checkpoint (a tensor of shape "
                            f"{list(self.size)} reaches past its storage of {data.size} "
                            f"elements); download the file again")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=[s * data.itemsize for s in self.stride], writeable=False)
        return np.array(view)  # a copy: views of one storage become independent arrays


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _allowed_globals():
    allowed = {("torch", name): _StorageType(name)
               for name in (*STORAGE_DTYPES, *UNSUPPORTED_STORAGES)}
    allowed.update({
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    })
    return allowed


def _check_storage_type(storage_type, what):
    if not isinstance(storage_type, _StorageType):
        raise UserError(f"{what}: not a PyTorch checkpoint (a storage of type "
                        f"{type(storage_type).__name__})")
    if storage_type.dtype is None:
        raise UserError(f"{what}: a {storage_type.name} tensor, which NumPy cannot hold; "
                        f"convert it to float32 in PyTorch first (tensor.float())")
    return storage_type


class _PersistentStorages:
    """``persistent_load`` for both layouts: one :class:`_Storage` per key, shared by views."""

    def __init__(self, what):
        self.what = what
        self.by_key = {}

    def __call__(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UserError(f"{self.what}: not a PyTorch checkpoint (unexpected persistent id "
                            f"{pid!r:.60})")
        storage_type = _check_storage_type(pid[1], self.what)
        key, numel = str(pid[2]), int(pid[4])
        if key not in self.by_key:
            self.by_key[key] = _Storage(storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return self.by_key[key]
        view_key, offset, view_numel = view
        if view_key not in self.by_key:
            self.by_key[view_key] = _StorageView(self.by_key[key], int(offset), int(view_numel))
        return self.by_key[view_key]


def _materialise(obj, what):
    """Replace every :class:`_TensorRef` inside dicts, lists and tuples by its array."""
    if isinstance(obj, _TensorRef):
        return obj.to_array(what)
    if isinstance(obj, dict):
        converted = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            converted[key] = _materialise(value, what)
        return converted
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(value, what) for value in obj)
    return obj


def _load_object(file, storages, what):
    unpickler = RestrictedUnpickler(file, _allowed_globals(), what, encoding="utf-8")
    unpickler.persistent_load = storages
    return unpickler.load()


def _read_legacy(file, what):
    plain = {}  # the header pickles hold only numbers, strings and dicts
    try:
        magic = RestrictedUnpickler(file, plain, what).load()
    except UnsafeFileError:  # a pickle of something else, e.g. a paddle.save file
        magic = None
    if magic != LEGACY_MAGIC:
        raise UserError(f"{what}: not a PyTorch checkpoint (a pickle without PyTorch's magic "
                        f"number; paddle.save files load with --pretrained or --load)")
    header = [RestrictedUnpickler(file, plain, what).load() for _ in range(2)]
    if not isinstance(header[1], dict) or not header[1].get("little_endian", True):
        raise UserError(f"{what}: a big-endian PyTorch file; re-save it on a little-endian "
                        f"machine")
    storages = _PersistentStorages(what)
    obj = _load_object(file, storages, what)
    keys = RestrictedUnpickler(file, plain, what).load()
    for key in keys:
        storage = storages.by_key.get(str(key))
        if not isinstance(storage, _Storage):
            raise UserError(f"{what}: corrupt PyTorch checkpoint (storage {key!r} is listed "
                            f"but never used)")
        count_bytes = file.read(8)
        if len(count_bytes) < 8:
            raise EOFError
        numel = struct.unpack("<q", count_bytes)[0]
        data = file.read(numel * storage.dtype.itemsize)
        if numel != storage.numel or len(data) < numel * storage.dtype.itemsize:
            raise EOFError
        storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<")).astype(
            storage.dtype, copy=False)
    return obj, storages


def _read_zip(path, what):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"{what}: a zip file but not a PyTorch checkpoint (no data.pkl)")
        root = pickles[0][:-len("data.pkl")]
        order = "<"
        if root + "byteorder" in names:
            order = "<" if archive.read(root + "byteorder").strip() == b"little" else ">"
        storages = _PersistentStorages(what)
        obj = _load_object(io.BytesIO(archive.read(pickles[0])), storages, what)
        for key, storage in storages.by_key.items():
            if isinstance(storage, _StorageView):
                continue
            data = archive.read(f"{root}data/{key}")
            if len(data) < storage.numel * storage.dtype.itemsize:
                raise EOFError
            storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder(order),
                                          count=storage.numel).astype(storage.dtype,
                                                                      copy=False)
    return obj, storages


def read_torch_file(path, what=None):
    """The object ``torch.save`` wrote to ``path``, every tensor as a NumPy array.

    Args:
        path: a ``.pth``/``.pth.tar`` file in the legacy or the zip layout.
        what: how errors name the file (default: the path).

    Raises:
        UserError: not a PyTorch checkpoint, truncated, or a dtype NumPy lacks (bfloat16,
            complex); one line naming the file.
        UnsafeFileError: the file asks for a global a checkpoint does not need.
    """
    what = what or path
    try:
        with open(path, "rb") as file:
            start = file.read(4)
            if start == ZIP_MAGIC:
                obj, _ = _read_zip(path, what)
            elif start[:1] == b"\x80":
                file.seek(0)
                obj, _ = _read_legacy(file, what)
            else:
                raise UserError(f"{what}: not a PyTorch checkpoint (neither a zip archive nor "
                                f"a pickle stream)")
    except FileNotFoundError:
        raise UserError(f"{what}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{what}: a directory, not a PyTorch checkpoint") from None
    except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, struct.error, KeyError,
            ValueError, TypeError, IndexError) as error:
        raise UserError(f"{what}: truncated or not a PyTorch checkpoint "
                        f"({type(error).__name__}); download it again") from None
    return _materialise(obj, what)



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
    not_tensors = [str(name) for name, value in obj.items() if not isinstance(value, np.ndarray)]
    if not_tensors:
        raise UserError(f"{what}: the state dict holds non-tensor entries "
                        f"({', '.join(not_tensors[:3])}); expected {{name: tensor}}")
    prefix = "module."
    return collections.OrderedDict(
        (name[len(prefix):] if name.startswith(prefix) else name, value)
        for name, value in obj.items())
