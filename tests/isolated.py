"""Running reader calls in a forked child, so that a crash or a runaway allocation fails a test
instead of killing the test run.

The child inherits the imported modules (no start-up cost), limits its address space to what
it already uses plus ``memory`` bytes (RLIMIT_AS), and reports each call's outcome through a
pipe. :func:`run_calls` runs many calls per child; when one kills the child, the calls after it
continue in a new child, and the killer is named.
"""
import os
import pickle
import select
import signal
import struct
import sys
import time

import pytest

from passl.errors import UserError

#: For test modules that use this one: forking and /proc are Linux's.
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="forked workers with RLIMIT_AS need Linux")

#: Address space a child may add to what it has when it starts.
DEFAULT_MEMORY = 768 << 20


def _address_space():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def outcome(call):
    """``('ok', value)``, ``('user_error', message)`` or ``('exception', 'Type: message')``."""
    try:
        return "ok", call()
    except UserError as error:
        return "user_error", str(error)
    except BaseException as error:  # noqa: B902 - every other outcome is what the test reports
        return "exception", f"{type(error).__name__}: {str(error)[:300]}"


def _send(fd, obj):
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<Q", len(data)) + data)


def _receive_all(fd, pid, deadline):
    """The messages a child sent until it closed the pipe; ``(messages, killed)``: the child
    is killed when ``deadline`` passes first."""
    chunks, killed = [], False
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    data, messages = b"".join(chunks), []
    while len(data) >= 8:
        length = struct.unpack("<Q", data[:8])[0]
        if len(data) < 8 + length:
            break
        messages.append(pickle.loads(data[8:8 + length]))
        data = data[8 + length:]
    return messages, killed


def _limit_memory(memory):
    import resource  # POSIX only: imported where it is used, so the module imports anywhere
    limit = _address_space() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def in_child(function, memory=DEFAULT_MEMORY, timeout=600):
    """Run ``function(send)`` in a forked child; ``send(obj)`` passes a picklable message to
    the parent. Returns ``(messages, end)``: ``end`` is None when the function returned, else
    ``'timeout'``, ``'signal N'``, or ``'exception: ...'`` / ``'exit N'``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_fd)
        code = 0
        try:
            _limit_memory(memory)
            function(lambda obj: _send(write_fd, obj))
        except BaseException as error:  # noqa: B902 - reported to the parent
            try:
                _send(write_fd, ("__child_exception__", f"{type(error).__name__}: {error}"))
            finally:
                code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    messages, killed = _receive_all(read_fd, pid, time.monotonic() + timeout)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    failure = [m[1] for m in messages if isinstance(m, tuple) and m[:1] == ("__child_exception__",)]
    messages = [m for m in messages if not (isinstance(m, tuple)
                                            and m[:1] == ("__child_exception__",))]
    if killed:
        return messages, "timeout"
    if os.WIFSIGNALED(status):
        return messages, f"signal {os.WTERMSIG(status)}"
    if failure:
        return messages, f"exception: {failure[0]}"
    code = os.WEXITSTATUS(status)
    return messages, None if code == 0 else f"exit {code}"


def run_calls(calls, memory=DEFAULT_MEMORY, timeout=600):
    """Outcomes of ``calls`` (functions without arguments), each ``(kind, value)`` as
    :func:`outcome` gives, or ``('crash', 'signal N'/'timeout'/...)`` for the call a child
    died in; the calls after it continue in a new child."""
    results, start, deadline = [None] * len(calls), 0, time.monotonic() + timeout

    def child(first, send):
        for index in range(first, len(calls)):
            send(("start", index))
            kind, value = outcome(calls[index])
            try:
                send(("done", index, kind, value))
            except Exception as error:  # a result that does not pickle is the test's bug
                send(("done", index, "exception", f"unpicklable result: {error}"))

    while start < len(calls):
        messages, end = in_child(lambda send: child(start, send), memory,
                                 max(1.0, deadline - time.monotonic()))
        last = start
        for message in messages:
            if message[0] == "start":
                last = message[1]
            else:
                results[message[1]] = (message[2], message[3])
        if results[last] is None:
            results[last] = ("crash", end)
        start = next((i for i in range(last, len(calls)) if results[i] is None), len(calls))
    return results


def run_call(call, memory=DEFAULT_MEMORY, timeout=300):
    """:func:`run_calls` for one call."""
    return run_calls([call], memory, timeout)[0]
