"""Pickle opcodes for building hostile files by hand (tests/test_hostile_files.py).

Each helper returns the bytes of one value's opcodes, protocol 2 (what paddle.save and
torch.save read and write), so a test spells out exactly the program a file runs.
"""
import io
import pickle as P
import struct
import zipfile

NUMPY = "numpy.core.multiarray"
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def glob(module, name):
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def text(value):
    data = value.encode()
    return P.BINUNICODE + struct.pack("<I", len(data)) + data


def num(n):
    if -2 ** 31 <= n < 2 ** 31:
        return P.BININT + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return P.LONG1 + bytes([len(data)]) + data


def raw(data):
    return P.BINBYTES + struct.pack("<I", len(data)) + data


def tup(*items):
    return P.MARK + b"".join(items) + P.TUPLE


def dct(**items):
    """A dict of str keys; values are opcodes."""
    pairs = b"".join(text(key) + value for key, value in items.items())
    return P.EMPTY_DICT + (P.MARK + pairs + P.SETITEMS if items else b"")


def program(*parts):
    """A whole pickle: PROTO 2, the parts, STOP."""
    return P.PROTO + b"\x02" + b"".join(parts) + P.STOP


def dtype(name, order="<", names=P.NONE, fields=P.NONE, elsize=-1, align=-1, flags=0):
    """``numpy.dtype(name)`` then BUILD with the state fields given (numpy's version 3)."""
    return (glob("numpy", "dtype") + tup(text(name), P.NEWFALSE, P.NEWTRUE) + P.REDUCE
            + tup(num(3), text(order), P.NONE, names, fields, num(elsize), num(align), num(flags))
            + P.BUILD)


def array(shape, dtype_ops, data):
    """``_reconstruct(ndarray, (0,), b'b')`` then BUILD ``(1, shape, dtype, False, data)``."""
    return (glob(NUMPY, "_reconstruct") + tup(glob("numpy", "ndarray"), tup(num(0)), raw(b"b"))
            + P.REDUCE + tup(num(1), tup(*map(num, shape)), dtype_ops, P.NEWFALSE, raw(data))
            + P.BUILD)


def generator_state(state_ops=None):
    """``GeneratorState`` by NEWOBJ, then BUILD with ``state_ops`` unless None."""
    made = glob("paddle.base.libpaddle", "GeneratorState") + P.EMPTY_TUPLE + P.NEWOBJ
    return made + (state_ops + P.BUILD if state_ops is not None else b"")


def nested_lists(depth):
    """``[[[...]]]`` ``depth`` deep."""
    return P.EMPTY_LIST * depth + P.APPEND * (depth - 1)


# ---------------------------------------------------------------- PyTorch files

def storage(kind, key, numel):
    """The persistent id of a storage: ``('storage', torch.<kind>, key, 'cpu', numel)``."""
    return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), num(numel)) \
        + P.BINPERSID


def tensor(storage_ops, offset, size, stride):
    return (glob("torch._utils", "_rebuild_tensor_v2")
            + tup(storage_ops, num(offset), tup(*map(num, size)), tup(*map(num, stride)),
                  P.NEWFALSE, glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE)
            + P.REDUCE)


def legacy_file(object_pickle, storages):
    """A legacy torch.save stream: header pickles, the object, the key list, each storage as
    an 8-byte element count and its bytes. ``storages``: ``[(key, count, bytes)]``."""
    stream = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle_bytes = P.dumps(header, protocol=2)
        stream.write(pickle_bytes)
    stream.write(object_pickle)
    stream.write(P.dumps([key for key, _, _ in storages], protocol=2))
    for _, count, data in storages:
        stream.write(struct.pack("<q", count) + data)
    return stream.getvalue()


def zip_file(object_pickle, entries, compression=zipfile.ZIP_STORED):
    """A zip torch.save file: ``archive/data.pkl`` and ``archive/data/<key>`` entries."""
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", compression) as archive:
        archive.writestr("archive/data.pkl", object_pickle)
        archive.writestr("archive/byteorder", "little")
        for key, data in entries.items():
            archive.writestr(f"archive/data/{key}", data)
    return stream.getvalue()


def edit_zip_entry(data, name, flag_bits=None, method=None):
    """Set the general-purpose flags or the compression method of entry ``name`` in both its
    local header and its central-directory record."""
    data = bytearray(data)
    encoded = name.encode()
    for signature, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            if data[start + name_at:start + name_at + len(encoded)] == encoded:
                if flag_bits is not None:
                    data[start + flags_at:start + flags_at + 2] = struct.pack("<H", flag_bits)
                if method is not None:
                    data[start + flags_at + 2:start + flags_at + 4] = struct.pack("<H", method)
            start += 4
    return bytes(data)
