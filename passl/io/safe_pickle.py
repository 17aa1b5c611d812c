"""Unpickling that runs no code from the file: only globals on an allow-list are built.

A pickle is a program: its ``GLOBAL``/``STACK_GLOBAL`` opcodes import any callable and
``REDUCE`` calls it. :class:`RestrictedUnpickler` resolves a global only when the
``(module, name)`` pair is on the reader's allow-list; any other global stops the load
with :class:`UnsafeFileError` naming it, before anything from the file is called. This is
what PyTorch's ``torch.load(weights_only=True)`` does, with the allow-list kept by each
file format (paddle.save files, PyTorch checkpoints) next to its reader.
"""
import io
import pickle

from passl.errors import UserError


class UnsafeFileError(UserError):
    """A file asked to build an object that a weights file has no reason to contain."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allowed globals.

    Args:
        file: a binary file object.
        allowed: ``{(module, name): object}``; the object is what the global resolves to
            (it may differ from the real import, e.g. a safe stand-in).
        what: how error messages name the file (e.g. ``"--pretrained evil.pdparams"``).
        hint: appended to the refusal (e.g. how to bypass it knowingly).
    """

    def __init__(self, file, allowed, what, hint="", **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed
        self.what = what
        self.hint = hint

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"{self.what}: refused to load: the file asks for the global {module}.{name}, "
                f"which a weights file does not need (it could run code){self.hint}") from None


def restricted_loads(data, allowed, what, hint="", persistent_load=None, **kwargs):
    """Unpickle ``data`` (bytes) with :class:`RestrictedUnpickler`.

    ``persistent_load``: a callable for formats that reference storage outside the
    pickle (PyTorch's), else None.
    """
    unpickler = RestrictedUnpickler(io.BytesIO(data), allowed, what, hint, **kwargs)
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load
    return unpickler.load()
