"""Tar shards of images: WebDataset-compatible tars plus an index for random access.

A shard directory holds::

    shard-000000.tar, shard-000001.tar, ...
        POSIX tars; each sample is two consecutive members with the same KEY (the sample's
        10-digit number): ``KEY.<ext>``, the image file's original bytes (``jpg`` for JPEG,
        else its own extension), and ``KEY.cls``, the label as ASCII decimal (-1: none).
        So WebDataset and ``tar tf`` read them as they are.
    index.npz
        ``np.load(allow_pickle=False)`` arrays: ``format`` [1]; ``shard_names`` [S] and
        ``shard_bytes`` [S] (file sizes, to detect truncated copies); per sample ``shard``
        [N], ``offset`` [N] (of its image bytes in the tar), ``length`` [N], ``label`` [N];
        ``classes`` [C] (class names, empty for image lists).

Samples are numbered in writing order; shard s holds a contiguous range of them.
"""
import io
import os
import tarfile

import numpy as np

from passl.errors import UserError
from passl.io.safe_write import replacing

FORMAT = 1
INDEX = "index.npz"


class ShardError(UserError):
    """A shard directory or file that cannot be read as written (one line, names the file)."""


def shard_name(number):
    return f"shard-{number:06d}.tar"


def image_extension(path):
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jpg") else ext


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _write_one_shard(path, samples):
    """Write ``samples`` [(key, ext, data, label)] to ``path``; ``[(offset, length)]`` of the
    image bytes, read back from the tar headers."""
    with replacing(path, durable=False) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, data, label in samples:
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
        with tarfile.open(tmp) as tar:
            places = [(m.offset_data, m.size) for m in tar.getmembers()
                      if not m.name.endswith(".cls")]
    return places


def write_shards(samples, directory, shard_size, classes=()):
    """Write ``samples`` (an iterable of ``(ext, image bytes, label)``) as shards of
    ``shard_size`` samples plus the index; returns the index arrays."""
    os.makedirs(directory, exist_ok=True)
    names, sizes, shard, offset, length, label = [], [], [], [], [], []
    pending = []

    def flush():
        name = shard_name(len(names))
        places = _write_one_shard(os.path.join(directory, name), pending)
        names.append(name)
        sizes.append(os.path.getsize(os.path.join(directory, name)))
        shard.extend([len(names) - 1] * len(places))
        offset.extend(p[0] for p in places)
        length.extend(p[1] for p in places)
        label.extend(s[3] for s in pending)
        pending.clear()

    for number, (ext, data, sample_label) in enumerate(samples):
        pending.append((f"{number:010d}", ext, data, sample_label))
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    index = {"format": np.array([FORMAT]), "shard_names": np.array(names, dtype=str),
             "shard_bytes": np.array(sizes, np.int64), "shard": np.array(shard, np.int32),
             "offset": np.array(offset, np.int64), "length": np.array(length, np.int64),
             "label": np.array(label, np.int64), "classes": np.array(list(classes), dtype=str)}
    with replacing(os.path.join(directory, INDEX), durable=False) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **index)
    return index


def read_index(directory):
    """The index arrays of ``directory`` after checking that every shard is whole."""
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard index not found; create the shards with "
                         f"tools/make_shards.py")
    try:
        with np.load(path, allow_pickle=False) as f:
            index = {key: f[key] for key in f.files}
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not a shard index ({e})") from None
    if int(index.get("format", [0])[0]) != FORMAT:
        raise ShardError(f"{path}: shard index format {index.get('format')}, this code reads "
                         f"{FORMAT}; re-create the shards with tools/make_shards.py")
    for name, expected in zip(index["shard_names"], index["shard_bytes"]):
        shard_path = os.path.join(directory, str(name))
        size = os.path.getsize(shard_path) if os.path.isfile(shard_path) else None
        if size != expected:
            state = "missing" if size is None else f"truncated ({size} of {expected} bytes)"
            raise ShardError(f"{shard_path}: shard {state}; copy it again or re-create the "
                             f"shards with tools/make_shards.py")
    return index


class ShardReader:
    """Reads one sample's bytes by seek + read; files are opened per process (safe in
    forked loader workers) and kept open, at most ``max_open`` at a time."""

    def __init__(self, directory, index, max_open=16):
        self.directory = directory
        self.names = [str(n) for n in index["shard_names"]]
        self.shard, self.offset, self.length = index["shard"], index["offset"], index["length"]
        self.max_open = max_open
        self._files, self._pid = {}, None

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}

    def where(self, number):
        return f"{os.path.join(self.directory, self.names[self.shard[number]])}:{number:010d}"

    def read(self, number):
        if self._pid != os.getpid():  # a forked worker: do not share the parent's offsets
            self._files, self._pid = {}, os.getpid()
        shard = int(self.shard[number])
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()  # the least recently used
            f = open(os.path.join(self.directory, self.names[shard]), "rb")
        self._files[shard] = f
        f.seek(int(self.offset[number]))
        data = f.read(int(self.length[number]))
        if len(data) != self.length[number]:
            raise ShardError(f"{self.where(number)}: shard truncated (image ends after "
                             f"{len(data)} of {self.length[number]} bytes); copy it again or "
                             f"re-create the shards with tools/make_shards.py")
        return data
