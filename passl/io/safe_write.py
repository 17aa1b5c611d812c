"""Output files written whole or not at all, and one-line errors when they cannot be written
(a full disk, a quota, a read-only mount) naming the file, the reason and the free space.

A file is replaced through a temporary file of its own in the same folder and a rename
(:func:`replacing`): each writer gets a new name (``.<name>.<pid>.<random>.tmp``, created
exclusively), so two processes or threads writing one path never write into, rename or
remove each other's temporary file; a reader sees the old file or a whole new one.
"""
import contextlib
import os
import secrets
import shutil

from passl.errors import ResumableError


class OutputWriteError(ResumableError):
    """An output file (checkpoint, metrics, weights) could not be written; nothing partial
    of it was left behind."""


def free_bytes(path):
    """Bytes an unprivileged user may still write on the file system holding ``path`` (its
    nearest existing parent directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def human_bytes(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def write_failure(path, error):
    """The OutputWriteError for ``error`` (an OSError) raised while writing ``path``."""
    reason = error.strerror or str(error)
    return OutputWriteError(f"cannot write {path}: {reason} ({human_bytes(free_bytes(path))} "
                            f"free on its file system)")


@contextlib.contextmanager
def reporting_write_errors(path):
    """Turn an OSError raised inside the block into :func:`write_failure` for ``path``."""
    try:
        yield
    except OSError as error:
        raise write_failure(path, error) from None


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_text(path, text):
    """Append ``text`` to ``path`` whole or not at all: what a failed write added is cut off
    again (a torn line in a JSON-lines file would break every later line). A failure is an
    OutputWriteError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise write_failure(path, error) from None
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, text.encode())
        except OSError as error:
            os.ftruncate(fd, size)
            raise write_failure(path, error) from None
    finally:
        os.close(fd)


def temporary_name(path):
    """A name for a temporary sibling of ``path`` that no other writer uses (not created)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path, durable=True):
    """Yield a new temporary path next to ``path``; when the block returns, the file written
    there (flushed to disk when ``durable``) is renamed over ``path``. When the block or the
    rename fails, the temporary file is removed and ``path`` is left as it was."""
    while True:
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # 48 random bits taken: draw again
            continue
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    """Replace ``path`` by ``text`` (see :func:`replacing`): a failure (an OutputWriteError)
    leaves the previous ``path`` as it was and no temporary file."""
    with reporting_write_errors(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path, durable=False) as tmp:
            with open(tmp, "w") as f:
                f.write(text)
