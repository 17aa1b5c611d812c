"""Running reader calls in a forked child, so that a crash or a runaway allocation fails a test
instead of killing the test run.

The child inherits the imported modules (no start-up cost), limits its address space to what
it already uses plus ``memory`` bytes (RLIMIT_AS), and reports each call's outcome through a
pipe. :func:`run_calls` runs many calls per child; when one kills the child, the calls after it
continue in a new child, and the killer is named.
"""
import os
import pickle
import resource
import select
import signal
import struct
import time

from passl.errors import UserError

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


def _child(calls, start, fd, memory):
    limit = _address_space() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for index in range(start, len(calls)):
        _send(fd, ("start", index))
        kind, value = outcome(calls[index])
        try:
            _send(fd, ("done", index, kind, value))
        except Exception as error:  # a value that does not pickle is the test's bug
            _send(fd, ("done", index, "exception", f"unpicklable result: {error}"))


def run_calls(calls, memory=DEFAULT_MEMORY, timeout=600):
    """Outcomes of ``calls`` (functions without arguments), each ``(kind, value)`` as
    :func:`outcome` gives, or ``('crash', 'signal N'/'exit N'/'timeout')`` for the call a
    child died in."""
    results, start, deadline = [None] * len(calls), 0, time.monotonic() + timeout
    while start < len(calls):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            os.close(read_fd)
            code = 0
            try:
                _child(calls, start, write_fd, memory)
            except BaseException:  # noqa: B902
                code = 3
            finally:
                os._exit(code)
        os.close(write_fd)
        messages, killed = _receive_all(read_fd, pid, deadline)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        last = start
        for message in messages:
            if message[0] == "start":
                last = message[1]
            else:
                results[message[1]] = (message[2], message[3])
        if results[last] is None:
            results[last] = ("crash", "timeout" if killed else
                             f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                             else f"exit {os.WEXITSTATUS(status)}")
        start = next((i for i in range(last, len(calls)) if results[i] is None), len(calls))
    return results


def run_call(call, memory=DEFAULT_MEMORY, timeout=300):
    """:func:`run_calls` for one call."""
    return run_calls([call], memory, timeout)[0]
