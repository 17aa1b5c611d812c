"""A deadline for the rendezvous of ``paddle.distributed.launch``, and why it failed.

Paddle's launcher (3.3) waits forever when the nodes cannot meet: a ``--master`` port held
by another program, a master address this node cannot reach, or nodes started with
different ``--nnodes`` (the smaller group starts and its workers then wait for ranks that
never come). ``tools/launch.py`` runs the launcher under :func:`run_launch`: every training
process reports when it has started and when it has joined the process group
(:func:`report`, called by :func:`passl.distributed.init_process_group`); when this node's
processes have not all joined within the deadline, the launcher and its processes are
stopped and one line says which case it is (:func:`diagnose`).
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from passl.errors import UserError

#: Directory where this node's training processes report (set by run_launch).
REPORT_DIR_ENV = "PASSL_RENDEZVOUS_DIR"
PROBE_SECONDS = 5
STOP_GRACE_SECONDS = 10


def report(stage):
    """Record that this process reached ``stage`` (``started`` or ``joined``)."""
    directory = os.environ.get(REPORT_DIR_ENV)
    if directory and os.path.isdir(directory):
        open(os.path.join(directory, f"{stage}.{os.getpid()}"), "w").close()


def _reported(directory, stage):
    return [int(path.rsplit(".", 1)[1])
            for path in glob.glob(os.path.join(directory, f"{stage}.*"))]


def launcher_option(args, name, default=None):
    """The value of ``--name VALUE`` or ``--name=VALUE`` among the launcher's own options
    (those before the training script)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg.endswith(".py"):
            break
    return default


def diagnose(master, nnodes, started):
    """One sentence on why the nodes did not meet at ``master`` (``host:port``), given how
    many of this node's processes have ``started`` (the launcher's rendezvous succeeded)."""
    if started:
        return (f"this node's {started} process(es) started but the process group never "
                f"formed: a process of another node is missing (started with another --nnodes, "
                f"or failed: see its log); start the same command on every node with the same "
                f"--nnodes (this node: {nnodes}) and --master")
    if not master:
        return ("the processes of this node did not start; see the launcher's log "
                "(--log_dir, default ./log)")
    host, _, port = master.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as e:
        return (f"master {master} is unreachable from this node ({e.strerror or e}); start the "
                f"master node (node rank 0) first or fix the --master address, and check "
                f"firewalls")
    try:
        urllib.request.urlopen(f"http://{master}/healthy", timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        pass  # an HTTP answer: it is a launcher's master
    except OSError:
        return (f"port {port} on {host} is held by another program (a process left over "
                f"from an earlier run?): stop it or choose a free port in --master")
    return (f"the master {master} is up but this node's processes never all joined: start "
            f"the same command on every node with the same --nnodes (this node: {nnodes}) "
            f"and --master")


def _stop(launcher, directory):
    """SIGTERM the launcher (it stops its workers), then SIGKILL whatever is left."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    for pid in _reported(directory, "started"):  # workers run in their own sessions
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_launch(launch_args, timeout):
    """Run ``python -m paddle.distributed.launch *launch_args``; returns its exit code.

    Raises UserError (after stopping it) when this node's processes have not all joined
    the process group within ``timeout`` seconds.
    """
    local = int(launcher_option(launch_args, "--nproc_per_node", "1"))
    with tempfile.TemporaryDirectory(prefix="passl-rendezvous-") as directory:
        env = {**os.environ, REPORT_DIR_ENV: directory}
        launcher = subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch",
                                     *launch_args], env=env)
        deadline = time.monotonic() + timeout
        try:
            while launcher.poll() is None and len(_reported(directory, "joined")) < local:
                if time.monotonic() > deadline:
                    reason = diagnose(launcher_option(launch_args, "--master"),
                                      launcher_option(launch_args, "--nnodes", "1"),
                                      len(_reported(directory, "started")))
                    _stop(launcher, directory)
                    raise UserError(f"no rendezvous within --rendezvous-timeout {timeout:g} s: "
                                    f"{reason}")
                time.sleep(0.2)
            return launcher.wait()
        except KeyboardInterrupt:
            _stop(launcher, directory)
            raise
