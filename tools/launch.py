"""paddle.distributed.launch with a rendezvous deadline and a one-line reason when it fails.

    python tools/launch.py [--rendezvous-timeout S] LAUNCH_ARGS... tools/train.py -c CFG ...
    python tools/launch.py --rendezvous-timeout 300 --master 10.0.0.1:6170 --nnodes 2 \\
        --nproc_per_node 8 --gpus 0,1,2,3,4,5,6,7 tools/train.py -c CFG --resume auto

Every argument after ``--rendezvous-timeout`` goes to ``python -m paddle.distributed.launch``
unchanged. The launcher itself waits forever for nodes that never come; here, when this
node's processes have not all joined the process group within the deadline, everything is
stopped and the exit code is 2 with one line naming the cause (see passl/rendezvous.py).
Otherwise the exit code is the launcher's; when it is not 0 (a process died), the last line
says where the logs are and how to continue.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

DEFAULT_TIMEOUT = 600


def split_timeout(argv):
    """``(timeout seconds, launcher arguments)``; the flag must come first so that nothing of
    the launcher's or the training script's arguments is taken for ours."""
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if argv and argv[0].startswith("--rendezvous-timeout"):
        value = argv[0].split("=", 1)[1] if "=" in argv[0] else (argv[1:2] or [""])[0]
        rest = argv[1:] if "=" in argv[0] else argv[2:]
        try:
            timeout = float(value)
        except ValueError:
            timeout = -1
        if timeout <= 0:
            raise UserError(f"--rendezvous-timeout {value!r}: expected a positive number of "
                            f"seconds")
        return timeout, rest
    return DEFAULT_TIMEOUT, argv


def main(argv=None):
    timeout, launch_args = split_timeout(sys.argv[1:] if argv is None else argv)
    if not any(arg.endswith(".py") for arg in launch_args):
        raise UserError("no training script: usage: tools/launch.py [--rendezvous-timeout S] "
                        "LAUNCH_ARGS... tools/train.py -c CFG")
    from passl.rendezvous import launcher_option, run_launch
    code = run_launch(launch_args, timeout)
    if code != 0:
        log_dir = launcher_option(launch_args, "--log_dir", "log")
        print(f"error: the launch failed (exit code {code}): see the lines above and "
              f"{log_dir}/workerlog.* on every node (a process that dies takes its peers down "
              f"with it); once fixed, run the same command with --resume auto on every node "
              f"to continue from the last checkpoint", file=sys.stderr)
    return code


if __name__ == "__main__":
    run_cli(main)
