"""Reading pickles without letting the file steer anything but plain data.

A pickle is a program for a stack machine: ``GLOBAL`` imports any object, ``REDUCE`` calls
it, ``BUILD`` hands a state to the ``__setstate__`` of whatever sits on the stack,
``SETITEM``/``APPEND`` call the ``__setitem__``/``append`` of whatever sits there. Python's
own ``Unpickler`` does all of that natively, so even an allow-list of harmless-looking globals
(``numpy.dtype``) lets a file reach native code with values it chose. :func:`restricted_load`
therefore interprets the opcodes itself (:class:`_Machine`), and:

- builds only ``None``, bools, ints, floats, str, bytes, tuples, lists, dicts and
  ``OrderedDict`` s itself; ``SETITEM(S)``/``APPEND(S)`` act only on the lists and dicts it
  made, never on anything a global returned;
- resolves a global only through the reader's :class:`Vocabulary`: a :class:`Constructor`
  (``REDUCE``/``NEWOBJ`` call its Python function with checked arguments) or an inert
  :class:`Marker` a constructor may take as an argument; ``BUILD`` reaches only a
  :class:`Pending` object such a constructor returned (which checks the state itself) or an
  ``OrderedDict`` whose vocabulary accepts that state; anything else is refused with one line;
- keeps the result a tree of bounded size: a container is frozen once placed inside another
  (so no cycles), nesting is at most :data:`MAX_DEPTH`, and the size of the result counted
  with every shared reference expanded (arrays by their bytes, anything else as 1) stays
  within :func:`budget_for` of the file's size, as do the arrays the file makes.

Errors are :class:`UnsafeFileError` (the file asks for something a weights file never needs)
or :class:`MalformedFileError` (broken or hostile structure; :class:`TruncatedFileError` when it
simply ends early), each one line that the format's reader prefixes with the file's name.
"""
import collections
import inspect
import pickletools
import struct

from passl.errors import UserError

#: Nesting of containers a file may have (a checkpoint has about 6).
MAX_DEPTH = 100
#: Stack entries and memo entries a file may make (real files need a few thousand).
MAX_STACK = 1_000_000
MAX_MEMO = 1_000_000
#: What a file may make beyond its own size (bytes, or objects when counting nodes).
SLACK = 1 << 20
#: The longest integer (in bytes) a file may hold: a random state needs 8.
MAX_INT_BYTES = 64
#: Bytes read from the file at a time for opcodes and small values.
_CHUNK = 1 << 16


def printable(text, limit=80):
    """``text`` (a name from a file) fit for a one-line message: control characters escaped,
    at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def budget_for(size):
    """Bytes (and objects) a file of ``size`` bytes may make: its size plus :data:`SLACK`."""
    return size + SLACK


class UnsafeFileError(UserError):
    """A file asked to build an object that a weights file has no reason to contain."""


class MalformedFileError(UserError):
    """A pickle whose structure no writer of the format makes (broken, or built to attack)."""


class TruncatedFileError(MalformedFileError):
    """The pickle stops before its end: an incomplete copy."""


class Constructor:
    """A global a file may call: ``call(*args)`` for ``REDUCE``, ``new(*args)`` for ``NEWOBJ``.

    Each function receives values this module built and checks them before making anything.
    """

    def __init__(self, name, call=None, new=None):
        self.name, self.call, self.new = name, call, new
        self.arity = {how: _arity(function) for how, function in (("call", call), ("new", new))
                      if function is not None}


def _arity(function):
    """``(least, most)`` arguments a constructor function takes after the machine."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    required = [p for p in parameters if p.default is inspect.Parameter.empty]
    return len(required), len(parameters)


class Marker:
    """A global a file may name but not call: only a constructor takes it as an argument
    (``numpy.ndarray`` for ``_reconstruct``, PyTorch's storage types for a storage)."""

    def __init__(self, name):
        self.name = name


class Pending:
    """An object under construction: a constructor returned it, ``BUILD`` completes it.

    Subclasses implement :meth:`build` (check the state, then make the value) and
    :meth:`value` (the finished object; raise when ``BUILD`` never came).
    """

    weight = 1

    def build(self, machine, state):
        raise NotImplementedError

    def value(self):
        raise NotImplementedError


class Vocabulary:
    """What one file format may contain.

    Args:
        globals: ``{(module, name): Constructor or Marker}``.
        ordered_dict_state: a function ``state -> None`` that accepts (or raises for) the
            state of a ``BUILD`` on an ``OrderedDict`` (PyTorch's ``_metadata``); None: refused.
        leaves: extra types (besides plain data) the result may hold.
    """

    def __init__(self, globals, ordered_dict_state=None, leaves=()):
        self.globals = globals
        self.ordered_dict_state = ordered_dict_state
        self.leaves = tuple(leaves)


_PLAIN = (type(None), bool, int, float, str, bytes)
_CONTAINERS = (list, dict, collections.OrderedDict)


class _Mark:
    """The MARK opcode's stack entry."""


def _describe(obj):
    if isinstance(obj, (Constructor, Marker)):
        return f"the global {obj.name}"
    return f"a {type(obj).__name__}"


class _Machine:
    """The pickle virtual machine restricted as the module doc says."""

    def __init__(self, file, size, vocabulary, encoding, persistent_load, budget):
        self.file, self.size, self.left = file, size, size
        self.start, self.fetched = file.tell(), 0  # bytes taken from the file into ``buffer``
        self.buffer, self.position = b"", 0
        self.vocabulary, self.encoding = vocabulary, encoding
        self.persistent_load = persistent_load
        self.budget = budget
        self.made = 0  # bytes of arrays made so far (see charge)
        self.stack, self.marks, self.memo = [], [], {}
        self.frozen, self.weight, self.depth = set(), {}, {}
        self.keep = []  # objects whose id() is a key above stay alive, so ids stay unique

    # ------------------------------------------------------------ reading the stream

    def read(self, n):
        if n < 0:
            raise MalformedFileError(f"a negative length ({n})")
        if n > self.left:
            raise TruncatedFileError(f"a value of {n} bytes where {self.left} are left")
        end = self.position + n
        if end <= len(self.buffer):
            data = self.buffer[self.position:end]
            self.position = end
        else:  # refill: small reads come from chunks, a large value is read as one piece
            rest = self.buffer[self.position:]
            need = n - len(rest)
            more = self.file.read(need if need >= _CHUNK else min(_CHUNK, self.size - self.fetched))
            self.fetched += len(more)
            if len(more) < need:
                raise TruncatedFileError("the file ends early")
            if need >= _CHUNK:
                data, self.buffer, self.position = rest + more, b"", 0
            else:
                data, self.buffer, self.position = rest + more[:need], more, need
        self.left -= n
        return data

    def release(self):
        """Leave the file right after the bytes the pickle used (the next part follows)."""
        self.file.seek(self.start + self.size - self.left)

    def read_line(self):
        line = bytearray()
        while True:
            byte = self.read(1)
            if byte == b"\n":
                return bytes(line)
            line += byte
            if len(line) > 1000:
                raise MalformedFileError("a text field longer than 1000 bytes")

    def unpack(self, fmt):
        layout = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        return layout.unpack(self.read(layout.size))[0]

    # ------------------------------------------------------------ values and their size

    def charge(self, nbytes):
        """Count ``nbytes`` of array data made from the file against the budget."""
        self.made += nbytes
        if self.made > self.budget:
            raise MalformedFileError(f"it describes {self.made:,} bytes of data, more than the "
                                     f"{self.budget:,} a file of its size may make")

    def _weight(self, obj):
        return self.weight.get(id(obj), getattr(obj, "weight", 1))

    def _track(self, obj, weight, depth):
        self.keep.append(obj)
        self.weight[id(obj)], self.depth[id(obj)] = weight, depth
        if weight > self.budget:
            raise MalformedFileError(f"its content, counting every shared reference, exceeds "
                                     f"{self.budget:,} (the file's size plus {SLACK:,})")
        if depth > MAX_DEPTH:
            raise MalformedFileError(f"containers nested deeper than {MAX_DEPTH}")
        return obj

    def use(self, obj, inside=None):
        """``obj`` becomes part of another value: freeze it; refuse what may not be inside."""
        if isinstance(obj, _Mark):
            raise MalformedFileError("a MARK used as a value")
        if inside is not None and obj is inside:
            raise MalformedFileError("a container placed inside itself")
        if isinstance(obj, (list, dict, tuple, Pending)):
            self.frozen.add(id(obj))
        return obj

    def container(self, obj):
        return self._track(obj, 1, 1)

    def insert(self, container, items):
        """Add ``items`` (values) to ``container`` (the caller did the adding)."""
        if id(container) in self.frozen:
            raise MalformedFileError("a container changed after it was placed in another")
        weight, depth = self.weight[id(container)], self.depth[id(container)]
        for item in items:
            self.use(item, inside=container)
            weight += self._weight(item)
            depth = max(depth, self.depth.get(id(item), 0) + 1)
        self._track(container, weight, depth)

    def make_tuple(self, items):
        for item in items:
            self.use(item)
        result = tuple(items)
        return self._track(result, 1 + sum(self._weight(i) for i in items),
                           1 + max((self.depth.get(id(i), 0) for i in items), default=0))

    def target(self, kinds, opcode):
        obj = self.stack[-1] if self.stack else None
        if type(obj) not in kinds:
            raise MalformedFileError(f"{opcode} on {_describe(obj)}, which the reader did not "
                                     f"make as a container")
        return obj

    # ------------------------------------------------------------ the stack

    def push(self, obj):
        if len(self.stack) >= MAX_STACK:
            raise MalformedFileError(f"more than {MAX_STACK:,} values on the pickle stack")
        self.stack.append(obj)

    def pop(self):
        if not self.stack:
            raise MalformedFileError("an opcode takes a value from an empty stack")
        obj = self.stack.pop()
        if isinstance(obj, _Mark):
            raise MalformedFileError("an opcode takes a MARK as a value")
        return obj

    def pop_mark(self):
        if not self.marks:
            raise MalformedFileError("an opcode needs a MARK that is not there")
        start = self.marks.pop()
        items = self.stack[start + 1:]
        del self.stack[start:]
        if any(isinstance(item, _Mark) for item in items):
            raise MalformedFileError("nested MARKs")
        return items

    def memo_put(self, index):
        if not self.stack:
            raise MalformedFileError("PUT with an empty stack")
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise MalformedFileError(f"more than {MAX_MEMO:,} memo entries")
        self.memo[index] = self.stack[-1]

    def memo_get(self, index):
        try:
            self.push(self.memo[index])
        except KeyError:
            raise MalformedFileError(f"GET of memo entry {index}, which was never PUT") from None

    # ------------------------------------------------------------ globals, calls, BUILD

    def find_global(self, module, name):
        try:
            return self.vocabulary.globals[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"the file asks for the global {printable(module)}."
                                  f"{printable(name)}, which a weights file does not need (it "
                                  f"could run code)") from None

    def call(self, func, args, how):
        if not isinstance(func, Constructor) or getattr(func, how) is None:
            raise MalformedFileError(f"{'REDUCE' if how == 'call' else 'NEWOBJ'} calls "
                                     f"{_describe(func)}, which the file may not call")
        if type(args) is not tuple:
            raise MalformedFileError(f"{func.name} called with {_describe(args)} as arguments")
        self.use(args)
        least, most = func.arity[how]
        if not least <= len(args) <= most:
            raise MalformedFileError(f"{func.name} called with {len(args)} arguments, which "
                                     f"it does not take")
        result = getattr(func, how)(self, *args)
        if isinstance(result, _CONTAINERS):
            return self.container(result)
        if isinstance(result, tuple):
            return self.make_tuple(list(result))
        return result

    def build(self, obj, state):
        self.use(state)
        if isinstance(obj, Pending):
            if id(obj) in self.frozen:
                raise MalformedFileError(f"BUILD on a {type(obj).__name__} already in use")
            obj.build(self, state)
        elif type(obj) is collections.OrderedDict and self.vocabulary.ordered_dict_state:
            self.vocabulary.ordered_dict_state(state)
        else:
            raise MalformedFileError(f"BUILD on {_describe(obj)}, which takes no state from "
                                     f"a file")

    # ------------------------------------------------------------ the loop

    def run(self):
        opcodes = _OPCODES
        while True:
            position = self.position
            if position < len(self.buffer) and self.left:  # the common case, inlined
                code = self.buffer[position:position + 1]
                self.position, self.left = position + 1, self.left - 1
            else:
                code = self.read(1)
            handler = opcodes.get(code)
            if handler is None:
                _refuse_opcode(code, self.size - self.left - 1)
            if handler(self) is _STOP:
                break
        if len(self.stack) != 1 or self.marks:
            raise MalformedFileError("the pickle ends with a stack that is not one value")
        return self.use(self.pop())


_STOP = object()
_STRUCTS = {}


def _op(*codes):
    def register(function):
        for code in codes:
            _OPCODES[code] = function
        return function
    return register


_OPCODES = {}


def _define_opcodes():
    """The opcodes a protocol 2-5 pickle of plain data, arrays and tensors needs."""
    op = _op

    @op(b"\x80")  # PROTO
    def _proto(m):
        if m.read(1)[0] > 5:
            raise MalformedFileError("an unknown pickle protocol")

    @op(b"\x95")  # FRAME: only a length hint
    def _frame(m):
        m.unpack("<Q")

    @op(b".")  # STOP
    def _stop(m):
        return _STOP

    @op(b"(")  # MARK
    def _mark(m):
        m.marks.append(len(m.stack))
        m.push(_Mark())

    @op(b"0")  # POP
    def _pop(m):
        if m.stack and isinstance(m.stack[-1], _Mark):
            raise MalformedFileError("POP of a MARK")
        m.pop()

    @op(b"1")  # POP_MARK
    def _pop_mark(m):
        m.pop_mark()

    @op(b"2")  # DUP
    def _dup(m):
        m.push(m.use(m.stack[-1]) if m.stack else m.pop())

    for code, value in ((b"N", None), (b"\x88", True), (b"\x89", False)):
        op(code)(lambda m, value=value: m.push(value))

    for code, fmt in ((b"J", "<i"), (b"K", "<B"), (b"M", "<H")):
        op(code)(lambda m, fmt=fmt: m.push(m.unpack(fmt)))

    def _long(m, length):
        if length > MAX_INT_BYTES:
            raise MalformedFileError(f"an integer of {length} bytes")
        m.push(int.from_bytes(m.read(length), "little", signed=True))

    op(b"\x8a")(lambda m: _long(m, m.unpack("<B")))   # LONG1
    op(b"\x8b")(lambda m: _long(m, m.unpack("<i")))   # LONG4
    op(b"G")(lambda m: m.push(m.unpack(">d")))        # BINFLOAT

    def _text(m, length, encoding):
        data = m.read(length)
        if encoding == "bytes":
            m.push(data)
            return
        try:
            m.push(data.decode(encoding))
        except UnicodeDecodeError:
            raise MalformedFileError(f"a string that is not {encoding}") from None

    op(b"C")(lambda m: _text(m, m.unpack("<B"), "bytes"))       # SHORT_BINBYTES
    op(b"B")(lambda m: _text(m, m.unpack("<I"), "bytes"))       # BINBYTES
    op(b"\x8e")(lambda m: _text(m, m.unpack("<Q"), "bytes"))    # BINBYTES8
    op(b"\x8c")(lambda m: _text(m, m.unpack("<B"), "utf-8"))    # SHORT_BINUNICODE
    op(b"X")(lambda m: _text(m, m.unpack("<I"), "utf-8"))       # BINUNICODE
    op(b"\x8d")(lambda m: _text(m, m.unpack("<Q"), "utf-8"))    # BINUNICODE8
    op(b"U")(lambda m: _text(m, m.unpack("<B"), m.encoding))    # SHORT_BINSTRING (Python 2)
    op(b"T")(lambda m: _text(m, m.unpack("<i"), m.encoding))    # BINSTRING

    @op(b")")  # EMPTY_TUPLE
    def _empty_tuple(m):
        m.push(m.make_tuple([]))

    for code, n in ((b"\x85", 1), (b"\x86", 2), (b"\x87", 3)):
        @op(code)  # TUPLE1-3
        def _small_tuple(m, n=n):
            items = [m.pop() for _ in range(n)][::-1]
            m.push(m.make_tuple(items))

    @op(b"t")  # TUPLE
    def _tuple(m):
        m.push(m.make_tuple(m.pop_mark()))

    @op(b"]")  # EMPTY_LIST
    def _empty_list(m):
        m.push(m.container([]))

    @op(b"}")  # EMPTY_DICT
    def _empty_dict(m):
        m.push(m.container({}))

    @op(b"l")  # LIST
    def _list(m):
        items = m.pop_mark()
        result = m.container([])
        m.insert(result, items)
        result.extend(items)
        m.push(result)

    def _set_items(m, target, items, opcode):
        if len(items) % 2:
            raise MalformedFileError(f"{opcode} with an odd number of values")
        keys = items[0::2]
        for key in keys:
            _check_key(key)
        m.insert(target, items)
        for key, value in zip(keys, items[1::2]):
            target[key] = value

    @op(b"d")  # DICT
    def _dict(m):
        items = m.pop_mark()
        result = m.container({})
        _set_items(m, result, items, "DICT")
        m.push(result)

    @op(b"s")  # SETITEM
    def _setitem(m):
        value, key = m.pop(), m.pop()
        _set_items(m, m.target((dict, collections.OrderedDict), "SETITEM"), [key, value],
                   "SETITEM")

    @op(b"u")  # SETITEMS
    def _setitems(m):
        items = m.pop_mark()
        _set_items(m, m.target((dict, collections.OrderedDict), "SETITEMS"), items, "SETITEMS")

    @op(b"a")  # APPEND
    def _append(m):
        value = m.pop()
        target = m.target((list,), "APPEND")
        m.insert(target, [value])
        target.append(value)

    @op(b"e")  # APPENDS
    def _appends(m):
        items = m.pop_mark()
        target = m.target((list,), "APPENDS")
        m.insert(target, items)
        target.extend(items)

    op(b"h")(lambda m: m.memo_get(m.unpack("<B")))     # BINGET
    op(b"j")(lambda m: m.memo_get(m.unpack("<I")))     # LONG_BINGET
    op(b"q")(lambda m: m.memo_put(m.unpack("<B")))     # BINPUT
    op(b"r")(lambda m: m.memo_put(m.unpack("<I")))     # LONG_BINPUT
    op(b"\x94")(lambda m: m.memo_put(len(m.memo)))     # MEMOIZE

    @op(b"c")  # GLOBAL
    def _global(m):
        module, name = m.read_line(), m.read_line()
        try:
            module, name = module.decode("ascii"), name.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedFileError("a global whose name is not ASCII") from None
        m.push(m.find_global(module, name))

    @op(b"\x93")  # STACK_GLOBAL
    def _stack_global(m):
        name, module = m.pop(), m.pop()
        if type(module) is not str or type(name) is not str:
            raise MalformedFileError("STACK_GLOBAL with names that are not strings")
        m.push(m.find_global(module, name))

    @op(b"R")  # REDUCE
    def _reduce(m):
        args = m.pop()
        m.push(m.call(m.pop(), args, "call"))

    @op(b"\x81")  # NEWOBJ
    def _newobj(m):
        args = m.pop()
        m.push(m.call(m.pop(), args, "new"))

    @op(b"b")  # BUILD
    def _build(m):
        state = m.pop()
        if not m.stack:
            raise MalformedFileError("BUILD with nothing to build")
        m.build(m.stack[-1], state)

    @op(b"Q")  # BINPERSID
    def _binpersid(m):
        if m.persistent_load is None:
            raise UnsafeFileError("a persistent id, which this format never contains")
        m.push(m.persistent_load(m.use(m.pop())))


_OPCODE_NAMES = {op.code.encode("latin1"): op.name for op in pickletools.opcodes}


def _refuse_opcode(code, offset):
    name = _OPCODE_NAMES.get(code)
    if name is None:
        raise MalformedFileError(f"not a pickle: byte 0x{code.hex()} at offset {offset:,}")
    raise UnsafeFileError(f"the pickle opcode {name}, which the files this reads never "
                          f"contain")


def _check_key(key):
    """Dict keys are plain values (or tuples of them): nothing with a file-chosen ``__hash__``."""
    if isinstance(key, tuple):
        for part in key:
            _check_key(part)
    elif type(key) not in _PLAIN:
        raise MalformedFileError(f"a dict key of type {type(key).__name__}")


_define_opcodes()


def restricted_load(file, size, vocabulary, encoding="latin1", persistent_load=None,
                    budget=None):
    """Read one pickle from ``file`` (at most ``size`` bytes) with the vocabulary given.

    ``budget``: what the pickle may make (see the module doc), by default
    :func:`budget_for` ``size``; a format whose pickle is part of a larger file passes that
    file's.

    Returns the unpickled object, in which every :class:`Pending` object is replaced by its
    value. Leaves the file positioned right after the pickle's STOP.

    Raises:
        UnsafeFileError, MalformedFileError, TruncatedFileError: one line without the file's name.
    """
    machine = _Machine(file, size, vocabulary, encoding, persistent_load,
                       budget_for(size) if budget is None else budget)
    result = machine.run()
    machine.release()
    return finish(result, vocabulary.leaves)


def finish(obj, leaves=(), convert=None):
    """A copy of the tree ``obj`` with every :class:`Pending` replaced by its value and
    ``convert(x)`` (when it returns something other than None) put in place of ``x``.

    Shared references stay shared (each is converted once); any leaf that is not plain data,
    an allowed ``leaves`` type, or converted is refused.
    """
    done = {}

    def walk(x):
        key = id(x)
        if key in done:
            return done[key]
        if isinstance(x, Pending):
            x = x.value()
        converted = convert(x) if convert is not None else None
        if converted is not None:
            result = converted
        elif type(x) in _PLAIN or isinstance(x, leaves):
            result = x
        elif type(x) in (dict, collections.OrderedDict):
            result = type(x)((k, walk(v)) for k, v in x.items())
        elif type(x) is list:
            result = [walk(v) for v in x]
        elif type(x) is tuple:
            result = tuple(walk(v) for v in x)
        else:
            raise MalformedFileError(f"the file holds {_describe(x)} where data belongs")
        done[key] = result
        return result

    return walk(obj)
