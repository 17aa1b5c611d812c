"""One run at a time per output_dir: ``output_dir/run.lock``.

Two runs writing one folder replace each other's checkpoints and interleave their logs, so a
run (process 0, for all the processes of the run) holds ``run.lock`` from start to end. The
file is created atomically (written aside, then hard-linked into place, which fails when the
name exists; also on NFS) and says who holds it::

    {"host": "node3", "pid": 4242, "pid_start": "81234567", "since": "2026-12-03 10:12:00"}

A second run, or a resume while the first still runs, stops with one line naming the holder.
A lock whose holder is gone is taken over with a notice; "gone" means:

* same host (same host name): no process with that PID, or one that started at another time
  (the PID was reused);
* another host: its heartbeat stopped. The holder touches the file every
  :data:`HEARTBEAT_SECONDS`; a lock untouched for :data:`STALE_AFTER_SECONDS` is stale (so the
  nodes' clocks must agree to within a few minutes).

The lock is released when the run ends, however it ends short of a kill; a killed run's
lock is taken over by the next run as above.
"""
import datetime
import json
import os
import socket
import threading
import time

from passl.errors import UserError
from passl.io.safe_write import temporary_name

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 300


def _process_start(pid):
    """When process ``pid`` started (clock ticks since boot, Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid, started):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    except (OverflowError, ValueError):
        return False
    return started is None or _process_start(pid) in (None, started)


def this_process():
    """The lock record of this process (see the module doc)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(
        os.getpid()), "since": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder):
    return (f"{holder.get('host', '?')} PID {holder.get('pid', '?')} since "
            f"{holder.get('since', '?')}")


def why_gone(holder, age):
    """Why the run that wrote ``holder`` (a lock last touched ``age`` seconds ago) no longer
    holds it, or None while it may still run."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return f"unreadable lock, untouched for {age:.0f} s" if age > STALE_AFTER_SECONDS \
            else None
    if holder.get("host") == socket.gethostname():
        if pid == os.getpid() and holder.get("pid_start") == _process_start(pid):
            return "left by an earlier run in this process"
        return None if _pid_alive(pid, holder.get("pid_start")) else "that process has ended"
    if age > STALE_AFTER_SECONDS:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_AFTER_SECONDS} s)"
    return None


class RunLock:
    """``output_dir/run.lock`` for one run (see the module doc)."""

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.record = None
        self._stop = threading.Event()
        self._made_dir = False

    def acquire(self):
        """Take the lock; returns a notice when a gone run's lock was taken over (else None).
        Raises a UserError naming the holder while another run holds it."""
        self._made_dir = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        notice = None
        for _ in range(10):  # each round ends in the lock or a holder, unless others race
            if self._create():
                self._start_heartbeat()
                return notice
            holder, age = self._read()
            if holder is None and age is None:
                continue  # released meanwhile
            gone = why_gone(holder, age)
            if gone is None:
                raise UserError(
                    f"output_dir {self.output_dir} is in use by another run ({describe(holder)}, "
                    f"lock file {self.path}); wait for it to end, or use -o output_dir=NEW_DIR")
            if self._remove_if_unchanged(holder):
                notice = (f"took over {self.path} from a run that is gone "
                          f"({describe(holder)}: {gone})")
        raise UserError(f"{self.path}: could not take the lock (other runs keep taking it); "
                        f"start one run at a time in {self.output_dir}")

    def _create(self):
        """Put this process's record in place atomically; False when a lock exists."""
        record = this_process()
        tmp = temporary_name(self.path)
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        finally:
            os.remove(tmp)
        self.record = record
        return True

    def _read(self):
        """``(record, seconds since last touched)``; ``(None, None)`` when there is no lock,
        ``({}, age)`` when it cannot be parsed."""
        try:
            with open(self.path) as f:
                text = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), age

    def _remove_if_unchanged(self, holder):
        """Move the gone run's lock aside and delete it, unless another process replaced it
        meanwhile (then put that one back). True when the stale lock was removed."""
        aside = temporary_name(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        try:
            with open(aside) as f:
                moved = json.loads(f.read() or "{}")
        except ValueError:
            moved = {}
        if moved != holder:  # a fresh lock appeared between reading and moving: restore it
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    def _start_heartbeat(self):
        def beat():
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except OSError:
                    return
        self._stop.clear()
        threading.Thread(target=beat, name="passl-run-lock", daemon=True).start()

    def release(self):
        """Remove the lock if this process holds it (idempotent), and ``output_dir`` too when
        :meth:`acquire` made it and nothing else was written there."""
        self._stop.set()
        if self.record is None:
            return
        holder, _ = self._read()
        if holder == self.record:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.record = None
        if self._made_dir:
            try:
                os.rmdir(self.output_dir)
            except OSError:  # the run wrote into it
                pass
