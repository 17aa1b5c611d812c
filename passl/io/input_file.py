"""Opening a file the user named, refusing what is not a regular file before reading it.

A directory, a named pipe or a device passed where a weights file belongs is a mistake with
its own fix; reading a FIFO would also block forever. The check is made on the opened file
descriptor (opened non-blocking, so a FIFO cannot hang the open), not on the path, so the file
cannot be swapped between the check and the read.
"""
import os
import stat

from passl.errors import UserError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def open_regular_file(path, what):
    """``(binary file object, size in bytes)`` of the regular file ``path``.

    Args:
        what: how errors name the file, e.g. ``"--pretrained w.pdparams"``.

    Raises:
        UserError: no such file, not a regular file (saying what it is), or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{what}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{what}: is a directory; pass a file") from None
    except OSError as error:
        raise UserError(f"{what}: cannot be opened ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
        raise UserError(f"{what}: is {kind}, not a file; pass a file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size
